#!/usr/bin/env bash
# Training throughput on one GPU (bf16, batch 64 x 512): jaxlm vs transformers eager and compiled,
# then a breakdown of jaxlm's step. Run from the repo root on the device machine:
#   bash scripts/device_bench.sh        (JSON lines in $OUT/bench_train_gpu.jsonl)
# Needs jax[cuda], flax, optax, orbax, torch, transformers; jaxlm itself comes from PYTHONPATH=.
# Every stage has its own time cap so the whole script stays under ~6 minutes (on an H200 the
# first run took 174 s, with the breakdown cut at 70 s before its last two parts).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # jax and torch share the GPU in one process
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
LOG=$OUT/bench_train_gpu.jsonl
: >"$LOG"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,driver_version --format=csv,noheader || true
python3 -c "import jax, torch, transformers, flax; print('jax', jax.__version__, jax.devices(),
  'torch', torch.__version__, 'transformers', transformers.__version__, 'flax', flax.__version__)"
python3 -c "import sys, jaxlm.model, jaxlm.train; assert 'grain' not in sys.modules; print('imports ok')"

rc=0
timeout 240 python3 scripts/bench_train.py --presets ts-33m,ts-8m --batch 64 --seq-len 512 \
    --steps 5 --rounds 4 --warmup 3 --compile-timeout 60 2>"$OUT/bench.stderr" | tee -a "$LOG"
rc=$((rc | $?))
timeout 120 python3 scripts/bench_train.py --breakdown --presets ts-33m --batch 64 --seq-len 512 \
    --steps 5 --rounds 3 2>"$OUT/breakdown.stderr" | tee -a "$LOG"
rc=$((rc | $?))
tail -n 5 "$OUT/bench.stderr" "$OUT/breakdown.stderr"
exit $rc
