#!/usr/bin/env bash
# The GPU half of the performance goals, in under 5 minutes on one GPU machine that has
# torch and torchvision but not Ray or MLflow (it exercises the Ray-free training core and
# the data path). Data: the 1k ImageNet sample's shards, carried with the call:
#   mkdir -p bench/.data && cp -r ../shared/data/imagenet-sample-1k-160 bench/.data/
#   (device call: carry bench/.data, run `bash bench/gpu_check.sh`)
# Each figure is a ratio measured in one run on this machine; results also go to
# $OUT/gpu_check.log and $OUT/packing.json when OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DATA=${DATA:-bench/.data/imagenet-sample-1k-160}
[ -d "$DATA" ] || DATA=../shared/data/imagenet-sample-1k-160
OUT=${OUT:-$(mktemp -d)}
LOG=$OUT/gpu_check.log
WORKERS=$(( $(nproc) > 14 ? 12 : $(nproc) - 2 ))
# ResNet-50 at 224 px on ImageNet-sized JPEGs (the sample re-encoded to a 375 px short side)
R50="--data $DATA --split val --per-class 1 --upscale 375 --arch resnet50 --no-low-res --size 224 --batch 256
     --preset standard --steps 30 --warmup 10"
{
  nvidia-smi -L || true
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
  echo "== parity: batch pipeline on the GPU vs the CPU (whole-image crop, no flip)"
  $PY bench/gpu_parity.py --data "$DATA"
  echo "== input pipeline, decode on $WORKERS CPU loader processes"
  $PY bench/input_bench.py $R50 --decode cpu --workers "$WORKERS"
  echo "== input pipeline, nvJPEG decode + batch augmentation on the GPU, 4 loader processes"
  $PY bench/input_bench.py $R50 --decode gpu --workers 4
  echo "== packing: K low-res ResNet-18 trainers at 32 px, batch 256, on one GPU"
  $PY bench/pack_bench.py --k 1 2 4 --batch 256 --seconds 10 --out "$OUT/packing.json"
  echo "== torch.compile on ResNet-50 224 px, batch 256"
  $PY bench/compile_bench.py --arch resnet50 --size 224 --no-low-res --batch 256 --steps 20
} 2>&1 | tee "$LOG"
