#!/usr/bin/env bash
# Every GPU figure of "Accuracy you can reproduce" in one call on a bare GPU machine
# (torch, torchvision, numpy; no Ray, MLflow or pydantic; no network):
#
#   python bench/gpu_stage.py            # here: data (4 train + 2 val shards) and pydantic
#                                        # wheels into bench/.gpu (git-ignored), size checked
#   bash bench/gpu_reproduce.sh          # there (device call: carry bench/.gpu)
#   bash bench/gpu_reproduce.sh --smoke  # here: the same steps at toy size on the CPU
#
# Steps, each a ratio or figure measured in this one run:
#   1. bench/reproduce.py --gpu --tta flip: 12 members of 4 families on the 4-shard subset,
#      packed on the GPU as the planner decides from each member's probed memory and rate,
#      scored with flip TTA (the reference's protocol) on all 10,000 val
#      images, beside a plain-PyTorch baseline;
#   2. reproducibility: the first 2 members for 1 epoch, trained twice, compared
#      (bench/compare_runs.py; within 0.002 error on a GPU, bitwise on a CPU);
#   3. resident mode vs synthetic tensors on the device (bench/resident_bench.py);
#   4. packing: 1 and 4 low-res ResNet-18 trainers, platform loop vs a plain loop
#      (bench/pack_bench.py --plain);
#   5. bounded decode: peak GPU memory of a batch with one 4000 x 3000 JPEG against
#      the same batch without it (bench/decode_memory.py).
# About 6 minutes on one H200 (the reproduce step about 4, the other figures about 2).
# Figures go to $OUT (the device call's folder) or outputs/gpu-reproduce: the whole log,
# summary.txt (each step's last lines), report.json, runs.yaml, packing.json and the plots.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
case "${1:-}" in
  "") ;;
  --smoke) MODE=smoke ;;
  *) echo "error: unknown option ${1}; valid: --smoke (or none)" >&2; exit 2 ;;
esac
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STAGE=${STAGE:-bench/.gpu}
RESULTS=${OUT:-outputs/gpu-reproduce}
if [ ! -f "$STAGE/data/tiny-imagenet-200/manifest.json" ]; then
  echo "error: no staged data in $STAGE/data; run: python bench/gpu_stage.py" >&2
  exit 2
fi
STAGE=$(cd "$STAGE" && pwd)
mkdir -p "$RESULTS"
WORK=$(mktemp -d)  # members and checkpoints stay on the machine; figures go to $RESULTS
# pydantic from the staged wheels when this Python lacks it (the GPU machine's image)
if ! "$PY" -c "import pydantic" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$STAGE"/wheels/*.whl
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export DATA_ROOT=$STAGE/data ENSEMBLE_STORAGE=$WORK/storage ENSEMBLE_CACHE=$WORK/cache MPLBACKEND=Agg
LOG=$RESULTS/gpu_reproduce.log
SUMMARY=$RESULTS/summary.txt
: >"$SUMMARY"

if [ "$MODE" = gpu ]; then
  SIZE=(--gpu) TOL=(--tolerance 0.002)
  RESIDENT=(--arch resnet18 --size 64 --batch 256 --classes 200 --per-class 100 --steps 20 --rounds 5)
  PACK=(--k 1 4 --batch 256 --seconds 3)
  DECODE=(--batch 256 --size 224)
else
  SIZE=(--config configs/reproduce/smoke.yaml) TOL=()
  RESIDENT=(--arch resnet20 --size 32 --batch 16 --classes 10 --per-class 20 --steps 2 --rounds 2 --device cpu)
  PACK=(--k 1 2 --batch 4 --size 16 --seconds 1 --warmup 1)
  DECODE=(--batch 8 --size 32 --device cpu)
fi

step() {  # step NAME CMD...: run, log, keep its last lines in the summary
  local name=$1; shift
  echo "== $name: $*" | tee -a "$SUMMARY"
  local start=$SECONDS
  set +e
  "$@" 2>&1 | tee "$WORK/step.log"
  local rc=${PIPESTATUS[0]}
  set -e
  tail -n 3 "$WORK/step.log" >>"$SUMMARY"
  echo "($name: exit $rc, $((SECONDS - start)) s)" | tee -a "$SUMMARY"
  return 0  # one failed step must not cost the others' figures
}

{
  echo "mode $MODE; $(date -u +%FT%TZ)"
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'cuda', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
  step reproduce "$PY" bench/reproduce.py "${SIZE[@]}" --tta flip --out "$WORK/reproduce"
  for f in report.json runs.yaml report/size_curve.png report/members.png; do  # kept now: the main figure
    if [ -f "$WORK/reproduce/$f" ]; then cp "$WORK/reproduce/$f" "$RESULTS/"; fi
  done
  for run in a b; do
    step "repeat-$run" "$PY" bench/reproduce.py "${SIZE[@]}" --epochs 1 --members 2 --no-baseline \
      --out "$WORK/repeat-$run"
  done
  step reproducible "$PY" bench/compare_runs.py "$WORK/repeat-a/runs.yaml" "$WORK/repeat-b/runs.yaml" "${TOL[@]}"
  step resident "$PY" bench/resident_bench.py --data "$DATA_ROOT/tiny-imagenet-200" "${RESIDENT[@]}"
  step packing "$PY" bench/pack_bench.py "${PACK[@]}" --plain --out "$RESULTS/packing.json"
  step decode "$PY" bench/decode_memory.py "${DECODE[@]}"
} 2>&1 | tee "$LOG"
rm -rf "$WORK"
echo "figures in $RESULTS:"
cat "$SUMMARY"
