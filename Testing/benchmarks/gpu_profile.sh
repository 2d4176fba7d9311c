#!/usr/bin/env bash
# Where the GPU run's wall time goes outside segment(): issue 14 asks 5 s on a GPU, gpu_check.sh measured 12.0 s
# with 5.3 s inside segment(). One short device call (under 3 minutes), same carry as gpu_check.sh
# (.whl with SimpleITK, .gpu/data/lung-tumor-volumes/lung2_image.nrrd); results under $OUT:
#   start-up.txt   wall of: python alone, import torch, first CUDA tensor, import relsegcore.cli + pipeline deps
#   importtime.txt python -X importtime of one relseg segment run (the 25 slowest imports)
#   segment.txt    cProfile of one relseg segment run on CUDA (the 40 largest cumulative entries)
# On the session machine: DEVICE=cpu bash Testing/benchmarks/gpu_profile.sh (RELSEG_SHARED_DATA for the CT).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-/tmp/gpu-profile}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import SimpleITK" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/RelSegCore${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DATA=${RELSEG_SHARED_DATA:-$PWD/.gpu/data}
CT=/tmp/gpu-profile-lung2-300.nii.gz
python3 - "$DATA" "$CT" <<'PY'
import sys
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, "Testing/benchmarks")
from bench_real_ct import real_ct

sitk.WriteImage(real_ct(Path(sys.argv[1]) / "lung-tumor-volumes" / "lung2_image.nrrd", 300), sys.argv[2])
PY
seconds() {  # LABEL COMMAND...: wall seconds of one run
    local label=$1 t0
    shift
    t0=$EPOCHREALTIME
    "$@" > /dev/null 2>&1
    awk -v a="$t0" -v b="$EPOCHREALTIME" -v l="$label" 'BEGIN { printf "%-44s %6.2f s\n", l, b - a }'
}
{
    seconds "python -c pass" python3 -c pass
    seconds "import torch" python3 -c "import torch"
    seconds "import torch + first $DEVICE tensor" python3 -c "import torch; torch.zeros(1, device='$DEVICE').sum().item()"
    seconds "import relsegcore.cli, pipeline, SimpleITK, cv2" \
        python3 -c "import relsegcore.cli, relsegcore.pipeline, SimpleITK, cv2, scipy.ndimage, skimage"
    seconds "read the CT (SimpleITK)" python3 -c "import SimpleITK as s; s.ReadImage('$CT')"
    seconds "relseg segment (whole command)" python3 -m relsegcore.cli segment "$CT" --out /tmp/gp-0 --device "$DEVICE"
    seconds "relseg segment (again)" python3 -m relsegcore.cli segment "$CT" --out /tmp/gp-1 --device "$DEVICE"
    # a fresh image may lack the bytecode an installed package has: compile it, then time again
    seconds "compileall (torch, SimpleITK, relsegcore)" python3 -m compileall -q -j 0 \
        "$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')" RelSegCore/relsegcore /tmp/site
    seconds "relseg segment (bytecode compiled)" python3 -m relsegcore.cli segment "$CT" --out /tmp/gp-4 --device "$DEVICE"
    seconds "relseg segment (bytecode compiled, again)" python3 -m relsegcore.cli segment "$CT" --out /tmp/gp-5 --device "$DEVICE"
} | tee "$OUT/start-up.txt"
[[ -n ${STARTUP_ONLY:-} ]] && exit 0
python3 -X importtime -m relsegcore.cli segment "$CT" --out /tmp/gp-2 --device "$DEVICE" 2> /tmp/importtime.raw > /dev/null
sort -t'|' -k2 -n -r /tmp/importtime.raw | head -25 > "$OUT/importtime.txt"
python3 -m cProfile -o /tmp/segment.prof -m relsegcore.cli segment "$CT" --out /tmp/gp-3 --device "$DEVICE" > /dev/null
python3 -c "import pstats; pstats.Stats('/tmp/segment.prof').sort_stats('cumulative').print_stats(40)" \
    | grep -v "^$" | cut -c1-160 > "$OUT/segment.txt"
python3 -c "import json, glob; print(json.load(open(glob.glob('/tmp/gp-1/*_report.json')[0]))['timing_s'])" \
    | tee -a "$OUT/start-up.txt"
head -60 "$OUT/segment.txt"; cat "$OUT/importtime.txt" | head -12
