#!/usr/bin/env bash
# The built-in backbone's whole recipe in one command: generated scenes, CrIBo pretraining with the
# learning curve, fp16 export, and the Table-1 row beside its baselines on held-out scenes.
#
#     scripts/train_builtin.sh                       # one GPU, bf16 (the default)
#     DEVICE=cpu PRECISION=auto BATCH=32 scripts/train_builtin.sh     # the CPU run of the shipped built-in
#
# Every setting is an environment variable (defaults below). The run resumes: run the same command
# again after an interruption. Outputs: $OUT/{checkpoint.pth,log.jsonl,config.json,curve.png,
# backbone.safetensors,backbone.json} (the base run), $OUT/stages/NAME/ (the same for each continued
# stage; the last one's backbone.safetensors is the result) and $OUT/table1/ (the Table-1 row, Markdown + JSON).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # bench/ imports the packages without `pip install -e .`

PYTHON=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16}
SCENES=${SCENES:-data/synthetic}
TRAIN_SCENES=${TRAIN_SCENES:-5000}      # seed 0: pretraining images (labels never read)
SUPPORT_SCENES=${SUPPORT_SCENES:-500}   # seed 1: held-out labelled support split
VAL_SCENES=${VAL_SCENES:-300}           # seed 2: held-out queries
OUT=${OUT:-runs/builtin-recipe}
ARCH=${ARCH:-vit_mini_convstem_patch16}  # the built-in's; vit_tiny_convstem_patch16 is run C's
STEPS=${STEPS:-20000}
BATCH=${BATCH:-256}                     # the learning rate below is per 256 images (DINO's scaling)
WORKERS=${WORKERS:-8}
AUGMENT=${AUGMENT:-mild}
EVAL_EVERY=${EVAL_EVERY:-500}
EVAL_SUPPORT=${EVAL_SUPPORT:-64}
EVAL_QUERIES=${EVAL_QUERIES:-60}
SEEDS=${SEEDS:-5}
RATIOS=${RATIOS:-1,8,64,128}
EXTRA=${EXTRA:-}                        # more train.py flags, e.g. EXTRA="--no-cross-image"
# Continued pretraining after the base run, in order: NAME:STEPS:AUGMENT:WARM (WARM: steps with the
# last layer frozen and without L_ci^o). 160-px views of 25-60 % of the scene; the first stage starts
# from the base run's export (fresh heads), each next one from the previous stage (networks and heads).
# "" stops after the base run. The default is the long run of docs/experiments/ (L2, L3, L3G, L4G, L5G, L6G, L7G, L8G, L9G).
STAGES=${STAGES-"L2:3000:mild:150 L3:3000:mild:0 L3G:2000:grey:0 L4G:3000:grey:0 L5G:3000:grey:0 L6G:3000:grey:0 L7G:3000:grey:0 L8G:3000:grey:0 L9G:3000:grey:0"}

for split in "train 0 $TRAIN_SCENES" "support 1 $SUPPORT_SCENES" "val 2 $VAL_SCENES"; do
  set -- $split
  have=0
  if [ -d "$SCENES/images/$1" ]; then have=$(find "$SCENES/images/$1" -name '*.png' | wc -l); fi
  if [ "$have" -lt "$3" ]; then
    "$PYTHON" -m cribo.synthetic --out "$SCENES" --num-images "$3" --seed "$2" --split "$1" --workers "$WORKERS"
  fi
done

# shellcheck disable=SC2086
"$PYTHON" train.py --data "$SCENES/images/train" --preset cpu-tiny --arch "$ARCH" \
  --device "$DEVICE" --precision "$PRECISION" --img-size 112 --batch-size "$BATCH" --max-steps "$STEPS" \
  --out-dim 1024 --lr 2e-3 --warmup-steps 300 --teacher-temp 0.04 --warmup-teacher-temp 0.04 \
  --teacher-temp-warmup-steps 0 --freeze-last-layer-steps 150 --ci-start-step 150 \
  --augment "$AUGMENT" --crop-scale 0.12 0.3 --num-workers "$WORKERS" --log-every 10 --ckpt-every 100 \
  --eval-every "$EVAL_EVERY" --eval-data "$SCENES" --eval-support "$EVAL_SUPPORT" \
  --eval-queries "$EVAL_QUERIES" --output-dir "$OUT" $EXTRA

"$PYTHON" train.py plot --output-dir "$OUT"
"$PYTHON" train.py export --output-dir "$OUT" --dtype fp16

init="$OUT/backbone.safetensors"
for stage in $STAGES; do
  IFS=: read -r name steps augment warm <<< "$stage"
  dir="$OUT/stages/$name"
  # shellcheck disable=SC2086
  "$PYTHON" train.py --data "$SCENES/images/train" --preset cpu-tiny --arch "$ARCH" \
    --device "$DEVICE" --precision "$PRECISION" --img-size 160 --batch-size "$BATCH" --max-steps "$steps" \
    --out-dim 1024 --lr 2e-3 --warmup-steps 300 --teacher-temp 0.04 --warmup-teacher-temp 0.04 \
    --teacher-temp-warmup-steps 0 --freeze-last-layer-steps "$warm" --ci-start-step "$warm" \
    --augment "$augment" --crop-scale 0.25 0.6 --num-workers "$WORKERS" --log-every 10 --ckpt-every 100 \
    --eval-every "$EVAL_EVERY" --eval-data "$SCENES" --eval-support "$EVAL_SUPPORT" \
    --eval-queries "$EVAL_QUERIES" --init-from "$init" --output-dir "$dir" $EXTRA
  "$PYTHON" train.py plot --output-dir "$dir"
  "$PYTHON" train.py export --output-dir "$dir" --dtype fp16
  init="$dir"
done

final="$OUT/backbone.safetensors"
rows=()
if [ "$init" != "$final" ]; then  # stages ran: score the last one beside the base run
  final="$init/backbone.safetensors"
  rows=(--weights "CrIBo base run=$OUT/backbone.safetensors")
fi
"$PYTHON" bench/baselines.py --root "$SCENES" --arch "$ARCH" "${rows[@]}" \
  --weights "CrIBo=$final" --ratios "$RATIOS" --seeds "$SEEDS" --cache-dir "$OUT/.cache" --out "$OUT/table1"
