#!/usr/bin/env bash
# One GPU check in at most 10 minutes on one H200, ending with ONE table:
#   tests   pytest -m gpu tests/test_gpu.py, pass/fail per test
#   train   GPT-B and GPT-L bf16 training steps/s (baseline and ST-AR) and MFU against the bf16
#           matmul peak measured in the same run (target >= 45% for GPT-L)
#   decode  GPT-B sampling tokens/s at batch 8, 64 and 256 with the compiled static decode
#   smoke   benchmarks/smoke_imagenet.py on CUDA (the paper's path at its real shapes)
#
#   benchmarks/gpu_check.sh                   # everything
#   benchmarks/gpu_check.sh --only train,decode
#   benchmarks/gpu_check.sh --dry-run         # CPU, tiny sizes: every part and the table, a few minutes
#
# Each part runs under its own time limit and within the total budget (GPU_CHECK_BUDGET seconds,
# default 570; 1500 for the dry run, whose limits are generous for a busy CPU); a part that fails
# or times out is a row of the table and the next part still runs.
# Nothing is installed or downloaded: it uses $PYTHON, else .venv/bin/python, else python3, with the
# checkout on PYTHONPATH. Work files go to $OUT/gpu_check (or a temporary folder) and the table to
# $OUT/gpu_check.md as well when OUT is set. TRAIN_SET adds run-config overrides to the train part,
# e.g. TRAIN_SET="train.compile=true". GPU_CHECK_FAIL=PART makes that part fail (to test the table).
set -u

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
DRY=0
ONLY="tests,train,decode,smoke"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --only) ONLY="$2"; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"
else PY="python3"; fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if [ -n "${OUT:-}" ]; then WORK="$OUT/gpu_check"; else WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"; fi
rm -rf "$WORK" && mkdir -p "$WORK"
BUDGET="${GPU_CHECK_BUDGET:-$([ "$DRY" = 1 ] && echo 1500 || echo 570)}"
START=$(date +%s)
RESERVE=15 # seconds kept for the table

"$PY" - > "$WORK/header.txt" 2>&1 <<'EOF'
import platform, torch
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"{platform.node()}, torch {torch.__version__}, {dev}")
EOF
[ -s "$WORK/header.txt" ] || echo "python $PY did not start" > "$WORK/header.txt"
[ "$DRY" = 1 ] && sed -i '1s/$/, DRY RUN (CPU, tiny sizes)/' "$WORK/header.txt"
echo "gpu_check: $(head -1 "$WORK/header.txt"); work folder $WORK; budget ${BUDGET} s"

# part NAME LIMIT CMD...: run CMD under min(LIMIT, what is left of the budget); record exit code and log
part() {
    local name="$1" limit="$2"; shift 2
    case ",$ONLY," in *",${name%%-*},"*) ;; *) return 0 ;; esac
    local left=$(( START + BUDGET - RESERVE - $(date +%s) ))
    [ "$left" -lt "$limit" ] && limit="$left"
    if [ "$limit" -lt 10 ]; then
        echo "skipped: no time left in the ${BUDGET} s budget" > "$WORK/$name.rc"
        echo "[gpu_check] $name: skipped (no time left)"
        return 0
    fi
    if [ "${GPU_CHECK_FAIL:-}" = "$name" ]; then set -- false; fi
    local t0=$(date +%s)
    echo "[gpu_check] $name: up to ${limit} s: $*"
    timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    echo "$rc" > "$WORK/$name.rc"
    echo "[gpu_check] $name: exit $rc after $(( $(date +%s) - t0 )) s"
}

TRAIN_EXTRA=()
for s in ${TRAIN_SET:-}; do TRAIN_EXTRA+=(--set "$s"); done

if [ "$DRY" = 1 ]; then
    # on a CPU the gpu tests skip; the rest runs at tiny sizes through the same code
    part tests 300 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -o addopts="" \
        --junitxml="$WORK/tests.xml"
    part train 300 "$PY" benchmarks/train_step.py --device cpu --models GPT-debug --block-size 16 \
        --precisions bf16 --variants baseline,star --sequences 4 --repeats 1 --no-memory \
        --json "$WORK/train.json" ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"}
    part decode 300 "$PY" benchmarks/gpu_check.py decode --device cpu --model GPT-debug --batches 2,4 \
        --model-args '{"vocab_size": 64, "block_size": 16}' \
        --precision fp32 --repeats 1 --no-compile --json "$WORK/decode.json"
    part smoke 600 "$PY" benchmarks/smoke_imagenet.py --tiny --device cpu --out "$WORK/smoke" \
        --json "$WORK/smoke.json" --timeout 300
else
    part tests 170 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -o addopts="" \
        --junitxml="$WORK/tests.xml"
    part train-B 90 "$PY" benchmarks/train_step.py --device cuda --models GPT-B --precisions bf16 \
        --variants baseline,star --sequences 64 --repeats 5 --no-memory --json "$WORK/train-B.json" \
        ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"}
    part train-L 110 "$PY" benchmarks/train_step.py --device cuda --models GPT-L --precisions bf16 \
        --variants baseline,star --sequences 64 --repeats 5 --no-memory --json "$WORK/train-L.json" \
        ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"}
    part decode 160 "$PY" benchmarks/gpu_check.py decode --device cuda --model GPT-B --batches 8,64,256 \
        --precision bf16 --json "$WORK/decode.json"
    part smoke 120 "$PY" benchmarks/smoke_imagenet.py --device cuda --out "$WORK/smoke" \
        --json "$WORK/smoke.json" --timeout 90
fi
rm -rf "$WORK/smoke/run" # GPT-B checkpoints (GBs): not worth bringing back

echo
TABLE_OUT=()
[ -n "${OUT:-}" ] && TABLE_OUT=(--out "$OUT/gpu_check.md")
if ! timeout 60 "$PY" benchmarks/gpu_check.py table "$WORK" ${TABLE_OUT[@]+"${TABLE_OUT[@]}"}; then
    # the table script itself failed: print what the exit codes say
    echo "| part | result |"
    echo "|---|---|"
    for f in "$WORK"/*.rc; do [ -e "$f" ] && echo "| $(basename "$f" .rc) | exit $(cat "$f") |"; done
fi
echo "(logs in $WORK; $(( $(date +%s) - START )) s in all)"
