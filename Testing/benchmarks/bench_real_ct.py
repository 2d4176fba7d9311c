"""Wall-clock of the user's command on real chest CT: ``relseg segment CT --out DIR`` from start to exit.

The synthetic in-process figure of ``bench_segment.py`` was half of what a user waits for on
a real CT (reading, import time, writing files, a lung step that works harder on real
anatomy). This times the real command, as a user runs it, on real CT built from
``../shared/data`` (never copied into the repository):

- ``lung2-300``: the pyradiomics ``lung2`` chest CT (512x512x61, 5 mm), resampled linearly
  along z to 300 slices (apex to base: a 512x512x300 chest CT);
- ``LUNG1-001``: a pleural-effusion patient at its native 419x363x58 (3 mm).

For each case and engine (``--engines``: OpenVINO when installed, the ``auto`` default, and PyTorch, the
reference): the wall time of the command, its peak memory (the child's max RSS), the stage times of
its report, and side by side in the same run the bare network time on the same engine: the default
infection model (and the lung model when the command uses one) forwarding the same number of 256x256
inputs. The ratio wall / network says how much of the wait is outside the network. Not part of pytest::

    python Testing/benchmarks/bench_real_ct.py [--device cpu] [--lungs auto|hu] [--engines auto,torch]
        [--repeat 1] [--cases lung2-300]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from relsegcore import pipeline, zoo
from relsegcore.device import select_device
from relsegcore.inference import predict_slices

DATA = Path(os.environ.get("RELSEG_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
CASES = {
    "lung2-300": (DATA / "lung-tumor-volumes" / "lung2_image.nrrd", 300),
    "LUNG1-001": (DATA / "pleural-effusion" / "LUNG1-001_ct.nii.gz", None),
}


def real_ct(path: Path, slices: int | None) -> sitk.Image:
    """The CT at ``path``, resampled linearly along z to ``slices`` slices over the same extent (None: as is)."""
    image = sitk.ReadImage(str(path))
    if slices is None or slices == image.GetSize()[2]:
        return image
    size = list(image.GetSize())
    extent = image.GetSpacing()[2] * (size[2] - 1)
    spacing = (*image.GetSpacing()[:2], extent / (slices - 1))
    reference = sitk.Image(size[0], size[1], slices, image.GetPixelID())
    reference.SetSpacing(spacing)
    reference.SetOrigin(image.GetOrigin())
    reference.SetDirection(image.GetDirection())
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, -1024.0, image.GetPixelID())


def time_command(ct_path: Path, out_dir: Path, device: str, lungs: str, engine: str) -> dict:
    """Wall seconds and peak memory of one ``relseg segment`` process, and its report's stage times."""
    command = [sys.executable, "-m", "relsegcore.cli", "segment", str(ct_path), "--out", str(out_dir),
               "--device", device, "--lungs", lungs, "--engine", engine]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    report = json.loads(next(out_dir.glob("*_report.json")).read_text())
    return {"wall_s": round(wall, 2), "peak_mb": round(max(peak_kb, before) / 1024), "stages_s": report["timing_s"],
            "lungs_method": report.get("lungs_method"), "model": report["model"]["name"],
            "engine": report.get("engine", "torch")}


def network_seconds(model: str | None, count: int, device: str, engine: str) -> float:
    """Seconds for ``model`` to forward ``count`` 256x256 inputs in the pipeline's batches (random pixels) on
    ``engine``, after a warm-up (the engine's conversion is not counted: the command's wall time has it)."""
    loaded = zoo.load_model(model, select_device(device), engine)
    size = int(loaded.card.preprocessing.get("input_size", 256))
    images = np.random.default_rng(0).integers(0, 256, (count, size, size), dtype=np.uint8)
    predict_slices(loaded, images[:2])  # warm-up
    start = time.perf_counter()
    predict_slices(loaded, images)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lungs", default="hu", help="lungs method passed to relseg segment --lungs")
    parser.add_argument("--engines", default="auto,torch", help="comma-separated relseg segment --engine values")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"real data not found at {DATA}", file=sys.stderr)
        return 1
    torch.set_num_threads(os.cpu_count() or 1)
    lung_card = pipeline.lung_model_card(args.lungs)
    print(f"cores: {os.cpu_count()}, torch {torch.__version__}, device {args.device}, lungs {args.lungs}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            path, slices = CASES[name]
            image = real_ct(path, slices)
            ct_path = Path(tmp) / f"{name}.nii.gz"
            sitk.WriteImage(image, str(ct_path))
            for run in range(args.repeat):
                for engine in args.engines.split(","):
                    out_dir = Path(tmp) / f"out-{name}-{run}-{engine}"
                    timed = time_command(ct_path, out_dir, args.device, args.lungs, engine)
                    count = image.GetSize()[2]
                    bare = network_seconds(None, count, args.device, engine)
                    if lung_card is not None:
                        bare += network_seconds(str(lung_card.path), count, args.device, engine)
                    models = " x 2 models" if lung_card else ""
                    print(f"\n{name} {image.GetSize()} run {run + 1}, --engine {engine} ({timed['engine']}): "
                          f"wall {timed['wall_s']:.1f} s, peak {timed['peak_mb']} MB, bare network ({count} "
                          f"slices{models}) {bare:.1f} s, wall / network {timed['wall_s'] / bare:.2f}")
                    print(f"  stages (s): {json.dumps(timed['stages_s'])}; lungs: {timed['lungs_method']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
