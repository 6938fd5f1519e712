#!/bin/bash
# Scale-out measurement (quantkit.eval.bench_scaleout) in one device call, run from the repository root;
# logs and JSON go to $OUT. MODE picks:
#   share  (default; one GPU, <= 8 min) 2 ranks sharing the GPU over gloo against the 1-rank run, at a small
#          but real shape: 2 decoder layers of the Llama-3-8B shape, hlq-w3g128, 16 x 2048 calibration tokens,
#          --offload. Checks that both write the byte-identical checkpoint; per-rank peak VRAM / RSS.
#   full   (a host with >= NGPUS GPUs) 1 against NGPUS GPUs (NCCL), the 8B shape with LAYERS of its 32
#          layers (default 6: the whole 32-layer run takes ~21 min on one GPU, longer than one device call),
#          hlq-w3g128, 128 x 2048 calibration tokens, --offload. LAYERS=32 is the full model.
# Both also print the --dry-run estimate per process for the 70B shape on 4 and 8 GPUs.
set -o pipefail
OUT=${OUT:-out/gpu_scaleout}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -q -e . >/dev/null 2>&1 || echo "pip install -e failed"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'gpus', torch.cuda.device_count())"
case ${MODE:-share} in
  share)
    timeout ${TIMEOUT:-420} python3 -m quantkit.eval.bench_scaleout --preset llama3-8b --layers ${LAYERS:-2} \
      --recipe ${RECIPE:-hlq-w3g128} --nsamples ${NSAMPLES:-16} --seq-len 2048 --device cuda --nproc 1 2 \
      --workdir /tmp/qk-scaleout --json "$OUT/scaleout_share.json" 2>&1 | tee "$OUT/scaleout_share.log" \
      | grep -v "it/s\]" | grep -vE "^\s*layer [0-9]+/" | tail -40 ;;
  full)
    timeout ${TIMEOUT:-570} python3 -m quantkit.eval.bench_scaleout --preset llama3-8b --layers ${LAYERS:-6} \
      --recipe ${RECIPE:-hlq-w3g128} --nsamples ${NSAMPLES:-128} --seq-len 2048 --device cuda \
      --nproc 1 ${NGPUS:-4} --workdir /tmp/qk-scaleout --json "$OUT/scaleout_full.json" 2>&1 \
      | tee "$OUT/scaleout_full.log" | grep -v "it/s\]" | grep -vE "^\s*layer [0-9]+/" | tail -40 ;;
  *) echo "unknown MODE '${MODE}': share or full" ;;
esac
