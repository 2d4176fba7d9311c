"""Where a 2D network's forward pass runs on the CPU: PyTorch (the reference) or OpenVINO.

Measured side by side on 2 AVX2 cores (``Testing/benchmarks/bench_engines.py``), covid-infection-2d on
real 256x256 CT slices: PyTorch 68-73 ms a slice in batches of 1 (122-132 ms in batches of 16), OpenVINO
48 ms, ONNX Runtime 46-47 ms (not used: it needs the onnx exporter package too, and the 5 % is within
the noise). OpenVINO converts the already verified PyTorch module (2-4 s; the converted copy is cached by
the weights' SHA-256 and checked against PyTorch on a probe before use) and runs it in float32, so its
labels match PyTorch's (Dice 1.0 on the real CTs of ``../shared/data``, ``test_engines.py``). It is an
optional extra (``pip install relsegcore[fast]``); without it, for 3D models and on the GPU, PyTorch runs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .errors import RelSegError
from .registry import default_home

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "openvino")
PROBE_TOLERANCE = 1e-2  # logits; float32 OpenVINO differs from PyTorch by about 1e-3 (summation order)
Forward = Callable[[torch.Tensor], torch.Tensor]


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def resolve_engine(engine: str, device: torch.device, dims: int) -> str:
    """The engine that will run: ``auto`` is OpenVINO for a 2D model on the CPU when installed, else PyTorch."""
    engine = (engine or "auto").lower()
    if engine not in ENGINES:
        raise RelSegError(f"Unknown engine {engine!r}; use one of {', '.join(ENGINES)}.")
    if engine == "torch" or device.type != "cpu" or dims != 2:
        if engine == "openvino":
            log.warning("OpenVINO runs 2D models on the CPU only; PyTorch runs this one.")
        return "torch"
    if openvino_installed():
        return "openvino"
    if engine == "openvino":
        raise RelSegError("--engine openvino was requested but OpenVINO is not installed: "
                          "pip install 'relsegcore[fast]' (or use --engine torch).")
    return "torch"


def forward_of(loaded) -> Forward:
    """``loaded``'s forward pass on its engine, converted on first use and kept on ``loaded`` (``zoo.LoadedModel``)."""
    if loaded.engine == "torch" or loaded.device.type != "cpu":
        return loaded.network
    if loaded.compiled is None:
        size = int(loaded.card.preprocessing.get("input_size", 256))
        loaded.compiled, loaded.engine = compile_forward(loaded.network, loaded.engine, size, loaded.card.sha256)
    return loaded.compiled


def compile_forward(network: torch.nn.Module, engine: str, input_size: int,
                    weights_sha256: str = "") -> tuple[Forward, str]:
    """A function from a float (N, 1, S, S) batch to the network's logits, and the engine it runs on.

    ``weights_sha256`` names the converted model in the cache (``cache_dir``); without it nothing is cached.
    An OpenVINO conversion that fails falls back to PyTorch with a logged warning: the job goes on.
    """
    if engine == "openvino":
        try:
            return _openvino_forward(network, input_size, weights_sha256), "openvino"
        except Exception as error:  # noqa: BLE001 - any conversion failure: the PyTorch path still works
            log.warning("OpenVINO could not convert the network (%s); running it with PyTorch.", error)
    return network, "torch"


def cache_dir() -> Path:
    """Converted models, by the weights' SHA-256 and the OpenVINO version (``$RELSEG_HOME/cache/openvino``)."""
    return default_home() / "cache" / "openvino"


def _openvino_forward(network: torch.nn.Module, input_size: int, weights_sha256: str) -> Forward:
    """The network compiled by OpenVINO, from the cache when a converted copy there passes the probe.

    Converting from PyTorch takes 2-4 s a process; a cached copy loads in 0.2 s. The cache is not trusted
    for its name: a copy whose logits on a fixed probe differ from PyTorch's is converted again.
    """
    import openvino as ov

    network = network.eval()
    core = ov.Core()
    cached = cache_dir() / f"{weights_sha256}-{input_size}-ov{ov.__version__.split('-')[0]}.xml"
    converted = _read_cached(core, cached) if weights_sha256 else None
    fresh = converted is None
    if fresh:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about the unused return_features branch
            converted = ov.convert_model(network, example_input=torch.zeros(1, 1, input_size, input_size),
                                         input=[(-1, 1, input_size, input_size)])
    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": "f32"}  # f32: the reference's outputs, on CPUs with bf16 too
    compiled = core.compile_model(converted, "CPU", config)

    def forward(batch: torch.Tensor) -> torch.Tensor:
        logits = compiled(np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32))[0]
        return torch.from_numpy(np.asarray(logits))

    probe = torch.from_numpy(np.random.default_rng(0).random((1, 1, input_size, input_size), dtype=np.float32))
    with torch.inference_mode():
        agrees = torch.allclose(forward(probe), network(probe), atol=PROBE_TOLERANCE)
    if not agrees:
        if fresh:
            raise RuntimeError("its logits differ from PyTorch's on the probe")
        log.warning("The cached OpenVINO model %s disagrees with the weights; converting again.", cached)
        cached.unlink(missing_ok=True)
        return _openvino_forward(network, input_size, weights_sha256)
    if fresh and weights_sha256:
        _write_cached(ov, converted, cached)
    return forward


def _read_cached(core, path: Path):
    try:
        return core.read_model(str(path)) if path.is_file() and path.with_suffix(".bin").is_file() else None
    except Exception:  # noqa: BLE001 - a damaged cache entry is converted again
        return None


def _write_cached(ov, converted, path: Path) -> None:
    """Save the converted model; the .xml (what ``_read_cached`` looks for) is renamed into place last."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            ov.save_model(converted, str(Path(tmp) / path.name), compress_to_fp16=False)  # the weights as they are
            os.replace(Path(tmp) / path.with_suffix(".bin").name, path.with_suffix(".bin"))
            os.replace(Path(tmp) / path.name, path)
    except Exception as error:  # noqa: BLE001 - no cache (read-only home): only the next start is slower
        log.info("Could not cache the converted model in %s: %s", path.parent, error)
