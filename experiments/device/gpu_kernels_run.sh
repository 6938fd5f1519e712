#!/bin/bash
# Kernel validation + benchmarks in one device call (the device tool's 10-minute limit per command):
# compiled-kernel tests at real shapes, then the int8 (FlexQ/COMET), ARCQuant and weight-only protocol
# benchmarks at K=4096, N=14336. Logs and JSON go to $OUT. STEPS picks a subset (default: all),
# TEST_FILES the test files, ARC_MS the ARC benchmark's batch sizes.
OUT=${OUT:-out/gpu_kernels}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -q -e . >/dev/null 2>&1 || echo "pip install -e failed"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
STEPS=${STEPS:-tests int8 arc wq}
for step in $STEPS; do
  t0=$(date +%s)
  case $step in
    tests) timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q -x ${TEST_FILES:-tests/test_kernels_int8.py \
             tests/test_kernels_nvfp4.py tests/test_kernels.py tests/test_cuda.py} 2>&1 | tail -25 ;;
    int8)  timeout 200 python3 -m quantkit.eval.bench_int8_gemm --shapes 4096x14336 \
             --json "$OUT/int8_gemm.json" 2>&1 | tail -40 ;;
    arc)   timeout 200 python3 -m quantkit.eval.bench_arcquant --shapes 4096x14336 --s 256 \
             --ms ${ARC_MS:-1,16,128,1024,4096} --json "$OUT/arcquant.json" 2>&1 | tail -30 ;;
    wq)    timeout 200 python3 -m quantkit.eval.bench_kernels --quick --out "$OUT/kernels.json" 2>&1 | tail -20 ;;
  esac
  echo "== $step: $(( $(date +%s) - t0 )) s"
done
