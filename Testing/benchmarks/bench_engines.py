"""The network's forward pass on the CPU, engine by engine and batch size by batch size, side by side.

Times ``predict_slices`` of a shipped 2D model on the same 256x256 inputs (a real CT's slices rendered
as the model sees them when ``../shared/data`` is there, random pixels otherwise) with PyTorch in batches
of 1 and 16, OpenVINO (``relsegcore[fast]``) and, when installed, ONNX Runtime (not used by relsegcore:
measured for the choice). Prints ms a slice and the ratio to PyTorch in batches of 16 (the old path).
Not part of pytest::

    python Testing/benchmarks/bench_engines.py [--model covid-infection-2d] [--slices 48] [--repeat 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from relsegcore import imageio, zoo
from relsegcore.data import intensity
from relsegcore.inference import predict_slices

DATA = Path(os.environ.get("RELSEG_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
CPU = torch.device("cpu")


def model_inputs(card: zoo.ModelCard, count: int) -> np.ndarray:
    """``count`` uint8 inputs: slices of LUNG1-001 rendered by the model's recipe, or random pixels."""
    path = DATA / "pleural-effusion" / "LUNG1-001_ct.nii.gz"
    size = int(card.preprocessing.get("input_size", 256))
    if not path.is_file():
        return np.random.default_rng(0).integers(0, 256, (count, size, size), dtype=np.uint8)
    hu = sitk.GetArrayFromImage(imageio.to_canonical(sitk.ReadImage(str(path))))
    z = np.resize(np.arange(len(hu)), count)
    return np.stack([intensity.model_input(hu[i], None, card.preprocessing)[0] for i in z])


def seconds_per_slice(run, images: np.ndarray, repeat: int) -> float:
    run(images[:2])  # warm-up (and OpenVINO's conversion)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run(images)
        best = min(best, time.perf_counter() - start)
    return best / len(images)


def onnxruntime_run(network: torch.nn.Module, size: int):
    """ONNX Runtime over an in-memory export (needs the onnx and onnxruntime packages)."""
    import onnxruntime

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(network, torch.zeros(1, 1, size, size), buffer, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False, opset_version=17)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def run(images: np.ndarray) -> None:
        for image in images:
            session.run(None, {"x": (image[None, None] / np.float32(255.0)).astype(np.float32)})

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="covid-infection-2d")
    parser.add_argument("--slices", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    reference = zoo.load_model(args.model, CPU, "torch")
    images = model_inputs(reference.card, args.slices)
    runs = {
        "torch, batches of 16": lambda x: predict_slices(reference, x, 16),
        "torch, batches of 1": lambda x: predict_slices(reference, x, 1),
    }
    if importlib.util.find_spec("openvino"):
        fast = zoo.load_model(args.model, CPU, "openvino")
        runs["openvino, batches of 1"] = lambda x: predict_slices(fast, x, 1)
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        runs["onnxruntime, batches of 1"] = onnxruntime_run(reference.network, images.shape[-1])
    print(f"{args.model}, {len(images)} slices of {images.shape[-1]} px, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    baseline = None
    for name, run in runs.items():
        seconds = seconds_per_slice(run, images, args.repeat)
        baseline = baseline or seconds
        print(f"  {name:28} {seconds * 1000:6.1f} ms a slice   x{baseline / seconds:.2f} vs torch in batches of 16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
