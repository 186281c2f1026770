#!/usr/bin/env bash
# The GPU figures of issue 4 in one short run (one H100 or H200, about 5 minutes):
#   $OUT/bench.jsonl  bench_train.py lines: ts-33m (jaxlm; with a float32 residual stream, as the
#                     torch peers run under autocast; with XLA's Triton GEMMs back on, which
#                     jaxlm turns off by default (jaxlm/xla_options.py); other loss settings;
#                     transformers' GPT-Neo eager and compiled; the hand-written GPT-Neo of
#                     scripts/torch_gpt_neo.py compiled), ts-8m, ts-33m with every layer global
#                     (jaxlm and the hand-written peer), then ts-33m under candidate XLA options,
#                     each A/B'd against plain jaxlm in the same process
#   $OUT/trace_ts-33m.json.gz  a Perfetto trace of jaxlm's ts-33m train step (kernel times)
#   $OUT/trace_summary.jsonl   scripts/trace_summary.py of it: ms per step by class, top fusions
#   $OUT/hlo.tgz      the optimised HLO of the jitted steps (fusion names in the trace)
# Usage: OUT=/tmp/out scripts/bench_gpu.sh
set -u
OUT=${OUT:-/tmp/bench_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.6  # leave torch room in one process
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # jaxlm from this checkout, installed or not
B="python3 scripts/bench_train.py --batch 64 --seq-len 512 --steps 20 --rounds 5"
nvidia-smi -L
python3 -c 'import jax, flax, optax, torch, transformers as t; print(jax.__version__, flax.__version__, optax.__version__, torch.__version__, t.__version__, jax.devices())'

XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_step" \
  timeout 300 $B --presets ts-33m --compile-timeout 120 --profile /tmp/prof \
  --impls 'jaxlm,jaxlm[residual_float32=true],jaxlm[xla_gpu_enable_triton_gemm=true],jaxlm[loss_chunk_rows=8192],jaxlm[loss_impl=plain],torch-eager,torch-compile,torch-gpt-compile' \
  | tee "$OUT/bench.jsonl"
timeout 60 $B --presets ts-8m --impls 'jaxlm,torch-eager' | tee -a "$OUT/bench.jsonl"
# the 1.40M peer, "a hand-written PyTorch GPT with flash attention", likely ran flash on
# every layer: this model, with a window that spans the 512 tokens (every layer global), in both
timeout 150 $B --presets ts-33m --compile-timeout 120 \
  --impls 'jaxlm[window_size=512],jaxlm[window_size=512+residual_float32=true],torch-gpt-compile[window_size=512]' | tee -a "$OUT/bench.jsonl"
# candidates for the next default: no q/k/v dot merging (no slices), cuDNN LayerNorm and GEMM
# fusions, the fusion autotuner
timeout 150 $B --presets ts-33m --impls 'jaxlm,jaxlm[xla_gpu_dot_merger_threshold_mb=0],jaxlm[xla_gpu_enable_cudnn_layer_norm=true],jaxlm[xla_gpu_cudnn_gemm_fusion_level=2],jaxlm[xla_gpu_experimental_enable_fusion_autotuner=true]' \
  | sed 's/"impl": "/"impl": "sweep:/' | tee -a "$OUT/bench.jsonl"

trace=$(find /tmp/prof -name 'perfetto_trace.json.gz' | head -1)
[ -n "$trace" ] && cp "$trace" "$OUT/trace_ts-33m.json.gz"
# the first jit_step dumped is the first jaxlm impl's, the one traced
hlo=$(ls -tr /tmp/hlo/*jit_step*after_optimizations.txt 2>/dev/null | head -1)
[ -n "$trace" ] && python3 scripts/trace_summary.py "$OUT/trace_ts-33m.json.gz" --steps 20 \
  ${hlo:+--hlo "$hlo"} | tee "$OUT/trace_summary.jsonl"
(cd /tmp/hlo 2>/dev/null && tar czf "$OUT/hlo.tgz" ./*after_optimizations.txt)
ls -la "$OUT"
