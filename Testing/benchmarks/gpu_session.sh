#!/usr/bin/env bash
# The figures only a GPU gives, in one device call of at most 9 minutes:
#   1. gpu_check.sh: 512x512x300 end to end on CUDA vs the bare network (issue: <= 5 s);
#   2. the search for the dual-encoder gain (RelSegCore/recipes/search.py) on all 5 folds at
#      the shipped budget (900 iterations x 16), all trainings side by side;
#   3. the annotation-efficiency learning curve on CUDA.
# Results go to $OUT (logs, search.md/json, fold results, learning curve).
#
# The device machine has no ../shared and no PyPI. Prepare what it needs on the session machine
# (ignored by git), then call the device tool with carry [".whl", ".gpu",
# "work-dirs/recipe/general/covid-general-encoder.pt", "work-dirs/recipe/general/covid-general-encoder.json"]
# (checkout 23 MB + 29 + 2 + 8 MB: under the 64 MiB a device run carries) and command
# "bash Testing/benchmarks/gpu_session.sh" with timeout_s 570:
#   bash Testing/benchmarks/gpu_session.sh --prepare
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p .whl .gpu/data
    ls .whl/*.whl >/dev/null 2>&1 || pip download --no-deps -d .whl SimpleITK  # see README: repack under 32 MB
    cp -r ../shared/data/covid-semiseg .gpu/data/
    mkdir -p .gpu/data/lung-tumor-volumes && cp ../shared/data/lung-tumor-volumes/lung2_image.nrrd .gpu/data/lung-tumor-volumes/
    test -f work-dirs/recipe/general/covid-general-encoder.pt || echo "missing work-dirs/recipe/general (stage 1)"
    du -sh .whl .gpu work-dirs/recipe/general/covid-general-encoder.pt
    exit 0
fi

OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT" ../shared && cp -r .gpu/data ../shared/
start=$SECONDS
bash Testing/benchmarks/gpu_check.sh > "$OUT/gpu_check.log" 2>&1
tail -12 "$OUT/gpu_check.log"
export PYTHONPATH="/tmp/site:$PWD/RelSegCore" PYTHONUNBUFFERED=1
SEARCH=(python3 RelSegCore/recipes/search.py --covid ../shared/data/covid-semiseg/train --shared-data ../shared/data
        --general work-dirs/recipe/general/covid-general-encoder.pt --out work-dirs/search-gpu
        --iterations 900 --batch-size 16 --device cuda --jobs 16
        --only "dual+relation-w10 (shipped recipe),fusion: bottleneck only,general encoder fine-tuned (lr x0.1),target encoder started from general,relation weight 100")
timeout $((480 - (SECONDS - start))) "${SEARCH[@]}" > "$OUT/search.log" 2>&1
echo "search exit $? after $((SECONDS - start)) s"; tail -8 "$OUT/search.log"
tar czf "$OUT/search.tgz" --exclude='*.pt' work-dirs/search-gpu 2>/dev/null
left=$((530 - (SECONDS - start)))
if (( left > 60 )); then
    timeout "$left" python3 Testing/benchmarks/annotation_efficiency.py --data ../shared/data/covid-semiseg/train \
        --device cuda --out "$OUT/annotation-efficiency" > "$OUT/annotation_efficiency.log" 2>&1
    tail -12 "$OUT/annotation_efficiency.log"
fi
ls -la "$OUT"
