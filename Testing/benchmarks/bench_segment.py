"""End-to-end segmentation benchmark: pipeline time vs the bare network, and peak memory vs slices.

Measured side by side in one run, on a synthetic 512x512 chest CT (relsegcore.demo, the
same anatomy resampled to each slice count):

1. end-to-end ``relsegcore.segment`` on 512x512xN (default N = 300) against the bare network
   forward over the same slices (the slices with lung, which are those the pipeline feeds
   the network), and over all N slices: the overhead ratio (target <= 30 %);
2. peak resident memory (VmHWM) of a fresh process segmenting 100 / 300 / 600 slices
   (target <= 3 GB at 300, growth no more than linear).

With no shipped default model, a randomly initialised network of the default
architecture stands in (same cost, meaningless output). Not part of pytest::

    python Testing/benchmarks/bench_segment.py                 # CPU, all threads
    python Testing/benchmarks/bench_segment.py --device cuda --skip-memory
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from relsegcore import pipeline, zoo
from relsegcore.demo import make_demo_ct
from relsegcore.device import describe_device, select_device
from relsegcore.inference import predict_slices
from relsegcore.models import DualEncoderUNet, NetworkConfig, count_parameters

CHEST_LENGTH_MM = 300.0  # the z extent of every benchmark CT, whatever its slice count
IN_PLANE_SPACING_MM = 0.7  # at 512 x 512


def benchmark_ct(slices: int, size: int = 512) -> sitk.Image:
    """A synthetic chest CT of ``size`` x ``size`` x ``slices`` covering the same anatomy at any slice count."""
    in_plane = IN_PLANE_SPACING_MM * 512 / size  # the same field of view at any matrix size
    base = make_demo_ct(shape=(100, size, size), spacing=(in_plane, in_plane, CHEST_LENGTH_MM / 100)).image
    if slices == base.GetSize()[2]:
        return base
    spacing = (in_plane, in_plane, CHEST_LENGTH_MM / slices)
    reference = sitk.Image(size, size, slices, base.GetPixelID())
    reference.SetSpacing(spacing)
    reference.SetOrigin(base.GetOrigin())
    return sitk.Resample(base, reference, sitk.Transform(), sitk.sitkLinear, -1000.0, base.GetPixelID())


def default_model(folder: Path) -> str:
    """The shipped default model if installed, else a random network of the default architecture saved in ``folder``."""
    try:
        card = zoo.find_model(zoo.DEFAULT_MODEL)
        return str(card.path.with_suffix(".json"))
    except Exception:  # noqa: BLE001 - not installed yet: measure the same architecture
        network = DualEncoderUNet(NetworkConfig())
        card = zoo.ModelCard(name="bench-random-default-architecture", version="0", description="random weights",
                             file="", sha256="", architecture={}, classes=["background", "infection"],
                             preprocessing={"input_size": 256, "window": [-1250, 250]})
        return str(zoo.save_model(network, card, folder))


def network_seconds(loaded: zoo.LoadedModel, count: int, repeats: int = 1) -> float:
    """Wall time of the bare batched forward over ``count`` model-sized slices (best of ``repeats``)."""
    size = int(loaded.card.preprocessing.get("input_size", 256))
    images = np.random.default_rng(0).integers(0, 256, (count, size, size), dtype=np.uint8)
    best = float("inf")
    for _ in range(repeats):
        _synchronise(loaded.device)
        start = time.perf_counter()
        predict_slices(loaded, images)
        _synchronise(loaded.device)
        best = min(best, time.perf_counter() - start)
    return best


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(ct_path: Path, model: str, device: str) -> dict:
    """Segment ``ct_path`` in a fresh process and return its peak resident memory (VmHWM)."""
    completed = subprocess.run(
        [sys.executable, __file__, "--child-memory", str(ct_path), "--model", model, "--device", device],
        capture_output=True, text=True, check=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _child_memory(ct_path: str, model: str, device: str) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    image = sitk.ReadImage(ct_path)
    start = time.perf_counter()
    pipeline.segment(image, model=model, device=device)
    seconds = time.perf_counter() - start
    status = Path("/proc/self/status").read_text()
    vm_hwm_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
    print(json.dumps({"peak_mb": round(vm_hwm_kb / 1024), "seconds": round(seconds, 2)}))


def compare_with_network(model: str, loaded: zoo.LoadedModel, args: argparse.Namespace) -> None:
    """End-to-end time on size x size x slices vs the bare forward over the same slices, in one run."""
    start = time.perf_counter()
    image = benchmark_ct(args.slices, args.size)
    print(f"synthetic CT {args.size}x{args.size}x{args.slices} built in {time.perf_counter() - start:.1f} s")

    network_seconds(loaded, 16)  # warm-up: CUDA context, kernels, CPU thread pool
    start = time.perf_counter()
    result = pipeline.segment(image, model=model, device=args.device)
    end_to_end = time.perf_counter() - start
    lung_slices = int(np.count_nonzero(sitk.GetArrayViewFromImage(result.lungs).any(axis=(1, 2))))
    bare_lung = network_seconds(loaded, lung_slices)
    bare_all = network_seconds(loaded, args.slices)
    timing = result.report["timing_s"]
    print(f"end-to-end: {end_to_end:.2f} s  (stages: {json.dumps(timing)})")
    print(f"bare network over the {lung_slices} slices with lung: {bare_lung:.2f} s -> "
          f"overhead {100 * (end_to_end / bare_lung - 1):+.0f} %")
    outside_network = end_to_end - timing["network"]
    print(f"time outside the network inside the same run: {outside_network:.2f} s = "
          f"{100 * outside_network / timing['network']:.0f} % of its network time (robust to CPU contention)")
    print(f"bare network over all {args.slices} slices: {bare_all:.2f} s -> "
          f"end-to-end / all-slices forward = {end_to_end / bare_all:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--model", help="model name or card path (default: the shipped default, else random)")
    parser.add_argument("--memory-slices", default="100,300,600", help="slice counts for the memory curve")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        _child_memory(args.child_memory, args.model, args.device)
        return

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="relseg-bench-") as scratch:
        scratch = Path(scratch)
        model = args.model or default_model(scratch)
        loaded = zoo.load_model(model, select_device(args.device), "auto")  # the engine segment() picks
        print(f"model: {loaded.card.name} ({count_parameters(loaded.network) / 1e6:.2f} M parameters), "
              f"device: {describe_device(loaded.device)}, engine {loaded.engine}, "
              f"torch threads: {torch.get_num_threads()}")

        if not args.skip_timing:
            compare_with_network(model, loaded, args)
        if args.skip_memory:
            return
        print("peak memory (VmHWM of a fresh process: read CT, segment):")
        previous = None
        for slices in (int(s) for s in args.memory_slices.split(",")):
            path = scratch / f"ct_{slices}.nrrd"
            sitk.WriteImage(benchmark_ct(slices, args.size), str(path))
            measured = peak_memory_mb(path, model, args.device)
            growth = ""
            if previous is not None:
                per_slice = (measured["peak_mb"] - previous[1]) / (slices - previous[0])
                growth = f", +{per_slice:.2f} MB per extra slice"
            print(f"  {slices:4d} slices: {measured['peak_mb']:6d} MB in {measured['seconds']:.1f} s{growth}")
            previous = (slices, measured["peak_mb"])
            path.unlink()


if __name__ == "__main__":
    main()
