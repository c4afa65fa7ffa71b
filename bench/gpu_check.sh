#!/usr/bin/env bash
# The GPU check of issue 14: one prepared script for a machine with one NVIDIA GPU and no network
# (torch + CUDA, transformers, peft, accelerate, safetensors, tokenizers, matplotlib, pytest there;
# trl, datasets and bitsandbytes maybe not).
#
#   bench/gpu_check.sh --prepare   # here, with PyPI: wheels the GPU machine may lack -> bench/.cache/wheels
#   bench/gpu_check.sh --dry-run   # here, on the CPU, tiny shapes, under a minute: every step a CPU can run
#   bench/gpu_check.sh             # on the GPU machine (<= 8 min): install the wheels offline, run the `gpu`
#                                  # tests, then rows 3 (rollouts), 7 (multi-LoRA step), 8 (scale), 1 (memory)
#                                  # and 2 (quantized) at Qwen2.5-0.5B's shape -> bench/RESULTS-gpu.md
#
# The device tool carries bench/.cache/wheels (its limit: 64 MiB in all; --prepare prints the size).
# bitsandbytes' wheel goes in only if it fits beside trl and datasets; without it the 4-bit rows say
# so and every bf16 / full-precision step still runs. Logs: bench/.cache/gpu-check/.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-gpu}
WHEELS=bench/.cache/wheels
LOGS=bench/.cache/gpu-check
LIMIT_MB=60  # of the tool's 64 MiB, leaving room for the working tree
mkdir -p "$LOGS"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "gpu_check [$(elapsed) s]: $*"; }

if [ "$MODE" = "--prepare" ]; then
    rm -rf "$WHEELS"
    .venv/bin/python -m bench.wheels "$WHEELS" --limit-mb $LIMIT_MB || { echo "gpu_check: --prepare failed"; exit 1; }
    echo "gpu_check: $(du -sm "$WHEELS" | cut -f1) MB in $WHEELS; the device tool carries it with" \
         "run(carry=[\"$WHEELS\"], command=\"bench/gpu_check.sh\")"
    exit 0
fi

if [ "$MODE" = "--dry-run" ]; then
    PY=.venv/bin/python
    export CUDA_VISIBLE_DEVICES=""  # the CPU parts only, even on a GPU machine
    [ -d "$WHEELS/core" ] && say "wheels: $(ls "$WHEELS"/core "$WHEELS"/bnb 2>/dev/null | grep -c whl) in $WHEELS" \
        || say "no $WHEELS yet: run --prepare"
    say "gpu tests (collected, skipped without CUDA)"
    $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -1
    say "scale: one configuration of each kind on a tiny Qwen2 shape, in this process"
    $PY -m bench.scale --dry-run --out bench/.cache/RESULTS-gpu-dry.md || { say "dry run FAILED"; exit 1; }
    say "dry run done: bench/.cache/RESULTS-gpu-dry.md"
    exit 0
fi

# ---------------------------------------------------------------- on the GPU machine
export HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SYS_PY=${PYTHON:-python3}
ENV=/tmp/marl-gpu-env
say "$($SYS_PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO GPU")')"
# a virtualenv over the system packages (torch, transformers, ...): pip sees them as installed
$SYS_PY -m venv --system-site-packages "$ENV" && PY=$ENV/bin/python || PY=$SYS_PY
WHL=$(ls "$WHEELS"/core/*.whl "$WHEELS"/bnb/*.whl 2>/dev/null)
if [ -n "$WHL" ]; then
    if ! $PY -m pip install -q --no-index --find-links "$WHEELS/core" --find-links "$WHEELS/bnb" \
            trl datasets $(ls "$WHEELS"/bnb/*.whl >/dev/null 2>&1 && echo bitsandbytes) >"$LOGS/pip.log" 2>&1; then
        say "pip could not resolve the wheels against the system packages (see $LOGS/pip.log): installing" \
            "the missing ones without dependencies"
        for w in $WHL; do
            mod=$(basename "$w" | cut -d- -f1 | tr 'A-Z' 'a-z'); mod=${mod/python_dateutil/dateutil}
            $PY -c "import $mod" 2>/dev/null || $PY -m pip install -q --no-index --no-deps "$w" >>"$LOGS/pip.log" 2>&1
        done
    fi
else
    say "no wheels in $WHEELS (run --prepare here and carry it): using what the machine has"
fi
say "versions: $($PY -c 'from bench.common import versions; print(", ".join(f"{k} {v}" for k, v in versions().items()))')"

say "gpu tests"
timeout 150 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider >"$LOGS/tests.log" 2>&1
say "gpu tests: $(tail -1 "$LOGS/tests.log") (log: $LOGS/tests.log)"

# rows at Qwen2.5-0.5B's shape, most wanted first; each keeps what the earlier ones wrote
run_row() {  # row, seconds
    local left=$(( 470 - $(elapsed) ))
    [ "$left" -lt 30 ] && { say "skipped $1: out of time"; return; }
    local t=$(( $2 < left ? $2 : left ))
    say "row $1 (at most $t s)"
    timeout "$t" $PY -m bench.run_all --model qwen2.5-0.5b --only "$1" --out bench/RESULTS-gpu.md \
        >"$LOGS/row-$1.log" 2>&1 || say "row $1 stopped: $(tail -1 "$LOGS/row-$1.log")"
}
$PY -m bench.scale --decode-bound --out "$LOGS/decode.json" >"$LOGS/decode.log" 2>&1 \
    && say "decode: $(cat "$LOGS/decode.json")" || say "decode bound failed: $(tail -1 "$LOGS/decode.log")"
run_row rollouts 60
run_row multilora 90
run_row scale 240  # 6 marl configurations + the peers: 2 rounds of 4 processes (bench/peers.py)
run_row memory 90
run_row quantized 60
if [ -f bench/RESULTS-gpu.md ]; then
    { echo; echo "## GPU check"; echo; echo "- gpu tests: $(tail -1 "$LOGS/tests.log")";
      [ -f "$LOGS/decode.json" ] && echo "- decode: $(cat "$LOGS/decode.json")"; } >> bench/RESULTS-gpu.md
fi
if [ -n "${OUT:-}" ]; then  # the device tool brings back what is under $OUT
    cp bench/RESULTS-gpu.md bench/RESULTS-gpu.json "$OUT"/ 2>/dev/null; cp -r "$LOGS" "$OUT"/logs
    cp -r bench/.cache/logs "$OUT"/bench-logs 2>/dev/null
fi
say "done: bench/RESULTS-gpu.md; logs in $LOGS"
