#!/usr/bin/env bash
# GPU figures for the README's performance section, in under 5 minutes on one GPU:
# end-to-end relsegcore.segment on a 512x512x300 synthetic chest CT on CUDA vs the bare
# network forward over the same slices, and the ratio (Testing/benchmarks/bench_segment.py).
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
timeout 270 python3 Testing/benchmarks/bench_segment.py --device cuda --skip-memory
