#!/bin/bash
# End-to-end latency in one device call: `quantkit bench latency` on the random-weight Llama-3-8B shape,
# batch 1, prompt 512, 128 tokens, torch.compile + CUDA graphs. RECIPES / LATENCY_ARGS override the defaults;
# JSON and log go to $OUT (the JSON is rewritten after every variant, so a run cut short keeps what it got).
OUT=${OUT:-out/gpu_latency}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -q -e . >/dev/null 2>&1 || echo "pip install -e failed"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
timeout ${LATENCY_TIMEOUT:-540} python3 -m quantkit.eval.bench_latency --shape llama3-8b \
  --recipe ${RECIPES:-rtn-w4g128,hlq-rtn-w2g64} --batch 1 --prompt 512 --gen 128 --compile --fit-budget 45 \
  --repeats 3 ${LATENCY_ARGS:---lm-head-bits 4} --json "$OUT/latency.json" 2>&1 | grep -v "it/s\]" | tail -60
