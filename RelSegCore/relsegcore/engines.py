"""Where a 2D network's forward pass runs on the CPU: PyTorch (the reference) or OpenVINO.

Measured side by side on 2 AVX2 cores (``Testing/benchmarks/bench_engines.py``), covid-infection-2d
on 256x256 slices: PyTorch 63 ms a slice in batches of 1 (112-130 ms in batches of 16), ONNX Runtime
44 ms, OpenVINO 37.5 ms. OpenVINO converts the already verified PyTorch module in memory (about 2 s,
once per model and process; nothing is written to disk) and runs it in float32, so its labels match
PyTorch's (Dice >= 0.99 on real CT, ``Testing/test_engines.py``). It is an optional extra
(``pip install relsegcore[fast]``); without it, or for 3D models and on the GPU, PyTorch runs.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Callable

import numpy as np
import torch

from .errors import RelSegError

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "openvino")
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
        loaded.compiled, loaded.engine = compile_forward(loaded.network, loaded.engine, size)
    return loaded.compiled


def compile_forward(network: torch.nn.Module, engine: str, input_size: int) -> tuple[Forward, str]:
    """A function from a float (N, 1, S, S) batch to the network's logits, and the engine it runs on.

    An OpenVINO conversion that fails falls back to PyTorch with a logged warning: the job goes on.
    """
    if engine == "openvino":
        try:
            return _openvino_forward(network, input_size), "openvino"
        except Exception as error:  # noqa: BLE001 - any conversion failure: the PyTorch path still works
            log.warning("OpenVINO could not convert the network (%s); running it with PyTorch.", error)
    return network, "torch"


def _openvino_forward(network: torch.nn.Module, input_size: int) -> Forward:
    import openvino as ov

    network = network.eval()
    example = torch.zeros(1, 1, input_size, input_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about the unused return_features branch
        converted = ov.convert_model(network, example_input=example, input=[(-1, 1, input_size, input_size)])
    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": "f32"}  # f32: the reference's outputs, on CPUs with bf16 too
    compiled = ov.Core().compile_model(converted, "CPU", config)

    def forward(batch: torch.Tensor) -> torch.Tensor:
        logits = compiled(np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32))[0]
        return torch.from_numpy(np.asarray(logits))

    return forward
