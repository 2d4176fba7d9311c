#!/usr/bin/env bash
# GPU figures for the README's performance section, in under 5 minutes on one GPU:
# 1. the user's command on a real 512x512x300 chest CT on CUDA, from start to exit (issue: <= 5 s), vs the
#    bare network over the same slices (bench_real_ct.py; the CT is built from lung2_image.nrrd, carried in
#    .gpu/data/lung-tumor-volumes/ by gpu_session.sh --prepare: the device machine has no ../shared);
# 2. end-to-end relsegcore.segment in-process on the synthetic 512x512x300 CT (bench_segment.py).
# SimpleITK (and any other missing wheel) comes from the folder .whl at the checkout's root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
if ! python3 -m pip install -q --no-deps --no-build-isolation -e RelSegCore 2>/tmp/pip-relsegcore.log; then
    echo "pip install -e RelSegCore failed (see below); using the source tree on PYTHONPATH"
    tail -3 /tmp/pip-relsegcore.log
    export PYTHONPATH="$PWD/RelSegCore:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 - <<'PY'
import importlib, sys
missing = [m for m in ("torch", "numpy", "scipy", "SimpleITK", "PIL") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python modules on this machine: {', '.join(missing)} (add their wheels to .whl)")
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, CPU cores: {__import__('os').cpu_count()}")
PY
if [[ -f .gpu/data/lung-tumor-volumes/lung2_image.nrrd ]]; then
    RELSEG_SHARED_DATA="$PWD/.gpu/data" timeout 150 python3 Testing/benchmarks/bench_real_ct.py --device cuda \
        --engines torch --cases lung2-300 --repeat 2
else
    echo "no real CT carried (.gpu/data/lung-tumor-volumes/lung2_image.nrrd): synthetic figures only"
fi
timeout 120 python3 Testing/benchmarks/bench_segment.py --device cuda --skip-memory
