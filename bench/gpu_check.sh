#!/usr/bin/env bash
# Every GPU check of this project in one command, for the bare offline GPU machine
# (../shared/gpu/README.md): after the staged parts are unpacked into /tmp/site, from the
# project's root:
#
#     bash .gpu/N/unstage.sh && bash bench/gpu_check.sh
#
# Steps, each under its own time limit, each run whatever the previous one did:
#   1. env      nvidia-smi, python, torch/CUDA, package versions
#   2. prepare  python -m engine.model --prepare (GGUF -> safetensors, ~30 s on the H200)
#   3. pytest   pytest -m gpu over the test files that carry the mark (the bot's test modules
#               need packages that are not staged, so they are not collected)
#   4. bench    python -m bench.serving --device cuda --json (new, previous, naive paths;
#               users 1,16,64 by default: BENCH_ARGS)
#   5. conversation  python -m bench.conversation --device cuda (TTFT per message, prefix cache on/off)
# Everything is tee'd into $OUT (the device machine's output folder; ./gpu-check-out when
# unset): one .log per step, serving.json, pytest-gpu.xml and summary.txt (the step verdicts
# and the benchmark's target table). The exit code is the number of steps that failed
# (0 = all passed).
#
# Limits in seconds: ENV_S, PREPARE_S, PYTEST_S, BENCH_S, CONV_S. The defaults (10 + 50 + 90 +
# 170 + 40) add up to 6 minutes, so one run fits a 15-minute lease with room to run it again.
# A limit of 0 skips its step (it never means "no limit"); anything but a whole number is
# refused before anything runs. BENCH_ARGS replaces the benchmark's extra arguments
# (default "--users 1,16,64").
set -u
cd "$(dirname "$0")/.." || exit 99
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PY=${PY:-python3}
if [ -z "${PYTHONPATH:-}" ] && [ -f /tmp/site/.ready ]; then export PYTHONPATH=/tmp/site; fi
if [ ! -f /tmp/site/.ready ] && [ "${DEVICE:-cuda}" != cpu ]; then
  echo "warning: /tmp/site/.ready is missing: the staged packages are not unpacked (bash .gpu/N/unstage.sh)"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
DEVICE=${DEVICE:-cuda}
ENV_S=${ENV_S:-10} PREPARE_S=${PREPARE_S:-50} PYTEST_S=${PYTEST_S:-90} BENCH_S=${BENCH_S:-170} CONV_S=${CONV_S:-40}
BENCH_ARGS=${BENCH_ARGS---users 1,16,64}
for limit in ENV_S PREPARE_S PYTEST_S BENCH_S CONV_S; do
  case ${!limit} in
    ''|*[!0-9]*) echo "gpu_check: $limit=${!limit}: expected a whole number of seconds (0 skips the step)" >&2; exit 99 ;;
  esac
done

summary="$OUT/summary.txt"
: > "$summary"
failed=0
started=$(date +%s)

# step NAME LIMIT_S CMD...: run CMD under `timeout`, output to the screen and $OUT/NAME.log.
# A limit of 0 skips the step: `timeout 0` would run it without any limit.
step() {
  local name=$1 limit=$2; shift 2
  local t0 rc verdict
  if [ "$limit" -le 0 ]; then
    echo "=== $name: skipped (limit 0)" | tee "$OUT/$name.log"
    printf '%-8s %-34s %4d s\n' "$name" "skipped (limit 0)" 0 | tee -a "$summary"
    return
  fi
  t0=$(date +%s)
  echo "=== [$(date +%H:%M:%S)] $name (limit ${limit} s): $*" | tee "$OUT/$name.log"
  timeout -k 15 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) verdict=ok ;;
    124|137) verdict="TIMED OUT after ${limit} s" ;;
    *) verdict="FAILED (exit $rc)" ;;
  esac
  if [ "$name" = pytest ] && [ "$rc" = 5 ]; then verdict="no gpu-marked tests collected"; rc=0; fi
  [ "$rc" = 0 ] || failed=$((failed + 1))
  printf '%-8s %-34s %4d s\n' "$name" "$verdict" "$(( $(date +%s) - t0 ))" | tee -a "$summary"
}

env_report() {
  nvidia-smi || echo "nvidia-smi: not available"
  "$PY" - <<'EOF'
import importlib.metadata as md, os, platform
import torch
print("python", platform.python_version(), "PYTHONPATH", os.environ.get("PYTHONPATH"))
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("GPU", p.name, f"{p.total_memory / 2**30:.0f} GiB", "capability", f"{p.major}.{p.minor}")
for pkg in ("transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "pydantic", "pytest", "pytest-asyncio"):
    try:
        print(f"{pkg:<15}", md.version(pkg))
    except md.PackageNotFoundError:
        print(f"{pkg:<15}", "ABSENT")
EOF
}

export PY
export -f env_report  # `timeout` runs programs, not shell functions
step env "$ENV_S" bash -c env_report
step prepare "$PREPARE_S" "$PY" -m engine.model --prepare
# Only the files that carry the mark are collected: the bot's modules need packages that are
# not staged (aiogram, ...) and would fail to import. -p no:cacheprovider: nothing is written
# into the tree.
mapfile -t gpu_files < <(grep -rlE 'mark\.gpu\b' tests --include='test_*.py' | sort)
if [ "${#gpu_files[@]}" -eq 0 ]; then
  echo "no test file under tests/ carries the gpu mark" | tee "$OUT/pytest.log"
  printf '%-8s %-34s %4d s\n' pytest "no gpu-marked tests" 0 | tee -a "$summary"
else
  step pytest "$PYTEST_S" "$PY" -m pytest -m gpu -q -rA -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$OUT/pytest-gpu.xml" "${gpu_files[@]}"
fi
# --budget leaves the benchmark a quarter of its limit (at least 30 s where the limit allows)
# to start CUDA, load and print its tables before the step's limit.
bench_budget=$(( BENCH_S > 60 ? BENCH_S - (BENCH_S / 4 > 30 ? BENCH_S / 4 : 30) : BENCH_S / 2 ))
[ "$bench_budget" -ge 1 ] || bench_budget=1
# shellcheck disable=SC2086
step bench "$BENCH_S" "$PY" -m bench.serving --device "$DEVICE" --json "$OUT/serving.json" \
  --budget "$bench_budget" $BENCH_ARGS
sed -n '/^## Issue 8 targets/,/^$/p' "$OUT/bench.log" | tee -a "$summary"
step conversation "$CONV_S" "$PY" -m bench.conversation --device "$DEVICE" --json "$OUT/conversation.json"
sed -n '/^| message/,/median/p' "$OUT/conversation.log" | tee -a "$summary"

echo "=== gpu_check: $failed step(s) failed, $(( $(date +%s) - started )) s in all; output in $OUT" | tee -a "$summary"
exit "$failed"
