#!/bin/bash
# Prefill measurements in one device call (10-minute limit): STEPS picks from
#   tests    the GPU kernel tests (TEST_FILES, TEST_TIMEOUT)
#   profile  `quantkit bench latency` per-op prefill profile (eager and CUDA-graph replay) at PROMPTS for
#            PROFILE_RECIPES (short decode: the prefill is what is looked at)
#   sweep    experiments/device/prefill_gemm_sweep.py (weight-only GEMM paths and configs at M = 32..2048)
#   variants experiments/device/prefill_gemm_sweep.py --variants (candidate fused kernels vs cuBLAS)
#   int8     `python -m quantkit.eval.bench_int8_gemm` (activation-quantized GEMMs, INT8_MS)
#   kernels  `quantkit bench kernels --ms 32,128,512,1024,2048` (the protocol's table, dispatch paths)
#   latency  `quantkit bench latency` end to end at PROMPTS (LATENCY_RECIPES, LATENCY_ARGS)
# Logs and JSON go to $OUT.
OUT=${OUT:-out/gpu_prefill}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -q -e . >/dev/null 2>&1 || echo "pip install -e failed"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
PROMPTS=${PROMPTS:-512 2048}
for step in ${STEPS:-tests profile sweep}; do
  t0=$(date +%s)
  case $step in
    tests)   timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -x ${TEST_FILES:-tests/test_cuda.py \
               tests/test_kernels_int8.py} 2>&1 | tail -15 ;;
    profile) for p in $PROMPTS; do
               timeout ${PROFILE_TIMEOUT:-200} python3 -m quantkit.eval.bench_latency --shape llama3-8b \
                 --recipe ${PROFILE_RECIPES:-rtn-w4g128,hlq-rtn-w2g64,flexq-w6a8} --batch 1 --prompt $p --gen 8 \
                 --repeats 3 --warmup 1 --fit-budget 8 --json "$OUT/profile_p$p.json" 2>&1 \
                 | grep -v "it/s\]" | tee "$OUT/profile_p$p.log" | grep -E "prefill|note|rror" | cut -c1-400
             done ;;
    sweep)   timeout ${SWEEP_TIMEOUT:-240} python3 experiments/device/prefill_gemm_sweep.py \
               --json "$OUT/sweep.json" --budget ${SWEEP_BUDGET:-170} > "$OUT/sweep.log" 2>&1
             sed -n '/best per/,$p' "$OUT/sweep.log"; grep -iE "error|Traceback" "$OUT/sweep.log" | head -5 ;;
    variants) timeout ${VARIANTS_TIMEOUT:-150} python3 experiments/device/prefill_gemm_sweep.py --variants \
               --json "$OUT/variants.json" --budget ${VARIANTS_BUDGET:-100} > "$OUT/variants.log" 2>&1
             tail -30 "$OUT/variants.log" | cut -c1-200 ;;
    int8)    timeout ${INT8_TIMEOUT:-200} python3 -m quantkit.eval.bench_int8_gemm --shapes ${INT8_SHAPES:-4096x14336} \
               --ms ${INT8_MS:-1024,4096} --json "$OUT/int8_gemm.json" 2>&1 | grep -v "it/s\]" | tail -${INT8_TAIL:-12} \
               | cut -c1-260 ;;
    kernels) timeout ${KERNELS_TIMEOUT:-200} python3 -m quantkit.eval.bench_kernels --ms 32,128,512,1024,2048 \
               --no-others --out "$OUT/kernels.json" 2>&1 | tail -25 ;;
    latency) for p in $PROMPTS; do
               timeout ${LATENCY_TIMEOUT:-270} python3 -m quantkit.eval.bench_latency --shape llama3-8b \
                 --recipe ${LATENCY_RECIPES:-rtn-w4g128,hlq-rtn-w2g64} --batch 1 --prompt $p --gen 128 --compile \
                 --fit-budget 20 --repeats 3 --warmup 1 ${LATENCY_ARGS:-} --json "$OUT/latency_p$p.json" 2>&1 \
                 | grep -v "it/s\]" | tee "$OUT/latency_p$p.log" | tail -${LATENCY_TAIL:-14} | cut -c1-300
             done ;;
  esac
  echo "== $step: $(( $(date +%s) - t0 )) s"
done
