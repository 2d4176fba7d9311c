#!/usr/bin/env bash
# Long schedules only a GPU affords, in one device call of at most 10 minutes: the shipped recipes of
# covid-infection-2d (2.0.0) and covid-lungs-2d (2.0.0) trained side by side, each on the 4 patient folds
# and on all 12 patients, for as many iterations as the call leaves (calibrated at its start; the
# CPU budgets were 1,600 / 2,000 iterations on folds and 4,000 / 2,000 for the shipped models).
# Then the folds' held-out patients are scored on the GPU (choose_postprocessing.py); the infection
# fold models and both all-patient models come back under $OUT (the infection folds are scored within
# the lungs and on non-COVID CT on the session machine: the lung folds and the CTs stay there).
#
# The device machine has no ../shared, no SimpleITK and no PyPI, and a call carries at most 64 MiB:
#   bash Testing/benchmarks/gpu_train.sh --prepare
# copies covid-ct-seg-2d into .gpu/train and renders the shipped recipe's negatives (the ct: volumes of
# covid-infection-2d's card, 16 lung slices each, exactly as relseg train renders them) into
# .gpu/train/negatives.npz, a `slices:` file (62 MB in all). Untrack the four shipped weights for the call, which
# needs none of them (git rm --cached Resources/Models/*.pt and list them in .git/info/exclude; git add them back
# after): the checkout is then 2 MB and the call under its 64 MiB. Then call the device tool with
# carry [".gpu/train"] and command "BUDGET_S=570 bash Testing/benchmarks/gpu_train.sh", timeout_s 600.
# A variant of both recipes in the same call: BATCH=32 (slices per step; the CPU recipes' 8 by default: on a GPU
# the step costs about the same), VERSION=2.4.0 (the all-patient models' card version), EXTRA="--base-channels 24"
# (appended to every relseg train), INFECTION_PATCH=none (the infection runs on whole slices, not 160 px crops) and,
# for --prepare, NEGATIVE_SLICES=48 (lung slices per negative CT; 16). ONLY=lungs trains the five lung runs alone and
# brings their fold models back too (the lung recipe needs no negatives; EXTRA="--base-channels 24" tries a wider
# network, for instance). ONLY=infection EXTRA=--upright trains the
# infection recipe on upright slices only (session 19; not the lung runs: covid-lungs-2d tells the orientation and
# must keep seeing both).
#
# Not the current default's recipe (session 38): covid-infection-2d 2.6.0 is three stages in a row
# (RelSegCore/recipes/default_infection.py), the third with the negatives rendered again with CT noise
# (--negative-noise 25,50,100,150: 720 slices instead of 80, 43 MB as a slices: file, 39 MB as an LZMA stack),
# which does not fit beside covid-ct-seg-2d (57.6 MB as LZMA stacks) in one call's 64 MiB; nor does a SimpleITK
# wheel to render them there. This script still trains the 2.0.0-2.1.x recipes (one stage, no noisy negatives).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
TRAIN=.gpu/train

if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p "$TRAIN" && rm -rf "$TRAIN/covid-ct-seg-2d" && cp -r ../shared/data/covid-ct-seg-2d "$TRAIN/" && chmod -R u+w "$TRAIN"
    python - <<'PY'
# The 1,163 CLAHE slices, infection and lung masks as LZMA-compressed uint8 stacks (57 MB instead of 61 MB of
# PNG in 3,489 files; the tool counts whole blocks); unpacked, losslessly, on the device machine.
import lzma, pathlib
import numpy as np
from PIL import Image

root = pathlib.Path(".gpu/train/covid-ct-seg-2d")
names = sorted(f.name for f in (root / "images").glob("*.png"))
(root / "images.txt").write_text("\n".join(names))
for folder in ("images", "masks", "lungs"):
    stack = np.stack([np.asarray(Image.open(root / folder / name)) for name in names])
    (root / f"{folder}.u8.xz").write_bytes(lzma.compress(stack.tobytes(), preset=9))
    for name in names:
        (root / folder / name).unlink()
PY
    python - <<'PY'
# relseg train's own reading of the card's --negatives (its parser and _read_negatives): the same slices.
import os

from relsegcore.cli import build_parser
from relsegcore.cli.train import _read_negatives

args = build_parser().parse_args([
    "train", "--data", "ctseg2d:.gpu/train/covid-ct-seg-2d", "--out", "work-dirs/unused", "--cache-dir", "work-dirs/cache",
    "--negatives", "ct:../shared/data/pleural-effusion/LUNG1-00*_ct.nii.gz",
    "--negatives", "ct:../shared/data/lung-tumor-volumes/lung1_image.nrrd",
    "--negative-fraction", "0.15", "--negative-slices", os.environ.get("NEGATIVE_SLICES", "16")])
_read_negatives(args).save(".gpu/train/negatives.npz")
PY
    du -sh "$TRAIN"
    exit 0
fi

OUT=${OUT:-/tmp/gpu-train}
BUDGET_S=${BUDGET_S:-570}
RUNS=${RUNS:-/tmp/gpu-runs}
# A second call on a machine still warm would find the first call's runs there and resume them (relseg train
# resumes from a checkpoint.pt; session 16 lost a call to that): start from an empty run folder.
rm -rf "$RUNS"
mkdir -p "$OUT" "$RUNS"
export PYTHONPATH="$PWD/RelSegCore${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
CAL=${CAL_ITERATIONS:-300}  # a dry run on a CPU sets fewer (and ITERATIONS)
DEVICE=${DEVICE:-cuda}
DATA="ctseg2d:$TRAIN/covid-ct-seg-2d"
BATCH=${BATCH:-8}
VERSION=${VERSION:-2.1.0}
ONLY=${ONLY:-}  # ONLY=infection or ONLY=lungs: that model's five runs alone (each faster)
infection() { [[ "$ONLY" != lungs ]]; }
lungs() { [[ "$ONLY" != infection ]]; }
INFECTION_PATCH=${INFECTION_PATCH:-160}  # INFECTION_PATCH=none: the infection runs learn whole 256 px slices
PATCH_ARGS=(--patch-size "$INFECTION_PATCH")
[[ "$INFECTION_PATCH" == none ]] && PATCH_ARGS=()
INFECTION=(--data "$DATA" --negatives "slices:$TRAIN/negatives.npz" --negative-fraction 0.15 "${PATCH_ARGS[@]}"
           --batch-size "$BATCH" --device "$DEVICE")
LUNGS=(--data "$DATA" --target lungs --patch-size 160 --batch-size "$BATCH" --augment-series --device "$DEVICE")
start=$SECONDS
python3 - "$TRAIN/covid-ct-seg-2d" <<'PY'
import lzma, pathlib, sys
import numpy as np
from PIL import Image

root = pathlib.Path(sys.argv[1])
names = (root / "images.txt").read_text().split("\n")
for folder in ("images", "masks", "lungs"):
    stack = np.frombuffer(lzma.decompress((root / f"{folder}.u8.xz").read_bytes()), np.uint8)
    for name, image in zip(names, stack.reshape(len(names), 256, 256)):
        Image.fromarray(image).save(root / folder / name, compress_level=1)
print(f"{len(names)} slices unpacked")
PY
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

read -ra EXTRA_ARGS <<< "${EXTRA:-}"
train_all() {  # ITERATIONS FOLDER EXTRA...: the ten trainings side by side
    local iterations=$1 folder=$2
    shift 2
    set -- "$@" "${EXTRA_ARGS[@]}"
    mkdir -p "$folder"
    for k in 0 1 2 3; do
        infection && python3 -m relsegcore.cli train "${INFECTION[@]}" --iterations "$iterations" --no-validation \
            --fold $k --folds 4 --out "$folder/infection-fold$k" --export "fold$k" "$@" > "$folder/infection-fold$k.log" 2>&1 &
        lungs && python3 -m relsegcore.cli train "${LUNGS[@]}" --iterations "$iterations" \
            --no-validation --fold $k --folds 4 --out "$folder/lungs-fold$k" --export "fold$k" "$@" > "$folder/lungs-fold$k.log" 2>&1 &
    done
    infection && python3 -m relsegcore.cli train "${INFECTION[@]}" --iterations "$iterations" --out "$folder/infection" \
        --export covid-infection-2d --model-version "$VERSION" "$@" \
        --description "COVID-19 infection on real chest CT (covid-ct-seg-2d, 12 patients), target encoder only, long schedule on a GPU" \
        > "$folder/infection.log" 2>&1 &
    lungs && python3 -m relsegcore.cli train "${LUNGS[@]}" --iterations "$iterations" --out "$folder/lungs" \
        --export covid-lungs-2d --model-version "$VERSION" "$@" \
        --description "Both lungs on real chest CT (covid-ct-seg-2d lung masks, 12 patients), long schedule on a GPU" \
        > "$folder/lungs.log" 2>&1 &
    wait
}

# 1. Calibrate: the ten runs side by side for 300 iterations; the slowest one's pace between its logged rows
#    at 100 and 300 (start-up and warm-up left out) sets the schedule.
train_all "$CAL" "$RUNS/calibration" --validate-every $((CAL / 3))
iterations=${ITERATIONS:-$(python3 - "$RUNS/calibration" "$BUDGET_S" "$((SECONDS - start))" "$CAL" <<'PY'
import csv, glob, sys
folder, budget, used, cal = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
paces = []
for log in glob.glob(f"{folder}/*/log.csv"):
    rows = {int(r["iteration"]): float(r["seconds"]) for r in csv.DictReader(open(log))}
    paces.append((rows[cal] - rows[cal // 3]) / (cal - cal // 3))
pace = max(paces)
left = budget - used - 40 - 120  # start-up of the ten runs; scoring, packing and a margin
print(max(500, int(left / pace) // 500 * 500))
print(f"{len(paces)} runs, slowest {1 / pace:.1f} it/s, {left:.0f} s left for training", file=sys.stderr)
PY
)}
echo "calibration done after $((SECONDS - start)) s: $iterations iterations each"
tail -3 "$(ls "$RUNS"/calibration/*-fold0.log | head -1)"

# 2. The long schedule.
train_all "$iterations" "$RUNS/long" --validate-every 500
echo "training done after $((SECONDS - start)) s"
for f in "$RUNS"/long/*.log; do echo "$(basename "$f"): $(grep -a '^{' "$f" | tail -1 | cut -c1-160)"; done

# 3. The folds' held-out patients, on the GPU.
infection && python3 Testing/benchmarks/choose_postprocessing.py --folds "$RUNS"/long/infection-fold{0,1,2,3} \
    --data "$DATA" --thresholds 0.5 --flip-tta --device "$DEVICE" --json "$RUNS/long/infection-sweep.json" 2>&1 \
    | grep -v "it/s" | tail -12
# The lungs at covid-lungs-2d 2.1.2's card (four views, components >= 0.1, the outside of the body dropped; the sweep's
# other rows: fewer views, all components), whose folds' figures (0.9823 / 0.9822 / 0.9750 / 0.9371 on the CPU recipe)
# they compare with.
lungs && python3 Testing/benchmarks/choose_postprocessing.py --folds "$RUNS"/long/lungs-fold{0,1,2,3} --data "$DATA" \
    --target lungs --thresholds 0.5 --flip-tta --upside-down-tta --fractions 0,0.1 --drop-outside-body \
    --device "$DEVICE" --json "$RUNS/long/lungs-sweep.json" 2>&1 | grep -v "it/s" | tail -12
echo "scored after $((SECONDS - start)) s"

# 4. Back: the four infection fold models (with ONLY=lungs the four lung fold models), the all-patient models,
#    everything small in one archive.
if infection; then
    for k in 0 1 2 3; do cp "$RUNS/long/infection-fold$k/fold$k.pt" "$OUT/infection-fold$k.pt"; done
    cp "$RUNS/long/infection/covid-infection-2d.pt" "$OUT/"
fi
if lungs; then
    [[ "$ONLY" == lungs ]] && for k in 0 1 2 3; do cp "$RUNS/long/lungs-fold$k/fold$k.pt" "$OUT/lungs-fold$k.pt"; done
    cp "$RUNS/long/lungs/covid-lungs-2d.pt" "$OUT/"
fi
tar czf "$OUT/runs.tgz" -C "$RUNS" --exclude='*.pt' long calibration
ls -la "$OUT"; echo "all done after $((SECONDS - start)) s"
