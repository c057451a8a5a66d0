#!/usr/bin/env bash
# Train the shipped shapes-tiny model from nothing: data -> six training steps -> GGUF -> verify -> quantize.
#
#   bash train/recipes/shapes_tiny.sh [RUN_DIR] [structured|direct]
#
# structured (default): the four-stage model the package ships (docs/shapes-tiny.md explains each step).
# direct: the same questions answered without stages, for the structured-vs-direct comparison.
# Everything goes under RUN_DIR (default runs/shapes-tiny); each step's time since the start is appended to
# RUN_DIR/times.txt. A stopped run continues where it stopped when started again (finished steps are skipped,
# training resumes from its last checkpoint). On 2 cores of an AMD EPYC the structured run takes 114 minutes.
set -euo pipefail
RUN=${1:-runs/shapes-tiny}
VARIANT=${2:-structured}
N=${SHAPES_N:-16000}                                   # training questions (one image each)
SEED=${SHAPES_SEED:-1}                                 # evaluation sets use seeds >= 5000
VISION_STEPS=${SHAPES_VISION_STEPS:-2000}              # step 1: the vision tower pretrained alone, then frozen
MAX_STEPS=${SHAPES_MAX_STEPS:-3000}                    # step 2: the main LLaVA stage (batch 16)
CAPTION_STEPS=${SHAPES_CAPTION_STEPS:-750}             # step 3: caption-only records (colours)
MIX_STEPS=${SHAPES_MIX_STEPS:-1500}                    # step 4: the main questions, reasoning as a walk over the caption
COLOUR_DRILL_STEPS=${SHAPES_COLOUR_DRILL_STEPS:-900}   # step 5: option drills whose options are colours
REPAIR_STEPS=${SHAPES_REPAIR_STEPS:-750}               # step 6: the step-4 mix again
SPLIT=${SHAPES_LENGTH_SPLIT:-4}                        # --length-split of steps 2-3
MIX_SPLIT=${SHAPES_MIX_LENGTH_SPLIT:-8}                # --length-split of steps 4-6
if [ "$VARIANT" = direct ]; then  # no stages, so no option step to drill and nothing after the main stage
    MAX_STEPS=${SHAPES_MAX_STEPS:-2520}; CAPTION_STEPS=0; SPLIT=${SHAPES_LENGTH_SPLIT:-1}
fi
mkdir -p "$RUN"
T0=$(date +%s)
# stamp WHAT: the time since this invocation started, to stderr and RUN/times.txt (a restarted run appends)
stamp() { local s=$(( $(date +%s) - T0 )); echo "[$VARIANT] $((s / 60)) min $((s % 60)) s: $*" | tee -a "$RUN/times.txt" >&2; }
# shapes DIR ARGS...: the training questions (same n, seed, wording) with the records ARGS ask for, unless DIR has them
MC_STEP=check; [ "$VARIANT" = structured ] || MC_STEP=match
shapes() { [ -f "$1/records.jsonl" ] || llavao1-data shapes --out "$1" --n "$N" --seed "$SEED" --mc-step "$MC_STEP" "${@:2}" -q; }

# Every step's data first, made side by side (each set is one process; the bytes are the same either way).
DATA="$RUN/data/train-$VARIANT"
if [ "$VARIANT" = direct ]; then
    shapes "$DATA" --kinds direct --judge-fraction 0.1 & JOBS=($!)
else
    shapes "$DATA" --kinds cot,judge,option --judge-fraction 0.1 --option-fraction 0.5 & JOBS=($!)
    shapes "$RUN/data/train-captions" --kinds caption --caption-fraction 1 & JOBS+=($!)
    shapes "$RUN/data/train-mix" --kinds cot,judge,option,caption,reasoning --judge-fraction 0.1 --option-fraction 0.5 \
        --caption-fraction 0.5 --reasoning-fraction 0.5 --reasoning-style read & JOBS+=($!)
    [ -f "$RUN/data/train-compare/records.jsonl" ] || llavao1-data shapes --out "$RUN/data/train-compare" --n 12000 \
        --seed 12 --kinds reasoning --reasoning-fraction 1 --mc-step check --reasoning-style read \
        --families count_color,compare,arithmetic,attribute,count_color_shape -q & JOBS+=($!)
    [ -f "$RUN/data/train-colour-drills/records.jsonl" ] || llavao1-data shapes --out "$RUN/data/train-colour-drills" \
        --n 8000 --seed 13 --kinds option --option-fraction 1 --families attribute,spatial --mc-step check -q & JOBS+=($!)
fi
for job in "${JOBS[@]}"; do wait "$job"; done  # a failed data set stops the recipe here
MIX="$RUN/data/train-mix-compare"
if [ "$VARIANT" = structured ] && [ ! -f "$MIX/records.jsonl" ]; then
    llavao1-data merge --out "$MIX" "$RUN/data/train-mix" "$RUN/data/train-compare"
fi
stamp "data: $RUN/data"

# Steps 1-2. lr 3e-4: at 1e-3 the from-scratch vision path collapses (image tokens turn constant).
TRAIN="$RUN/train-$VARIANT"
RESUME=""; [ -d "$TRAIN/checkpoints" ] && RESUME=--resume
[ -f "$TRAIN/final/model.safetensors" ] || llavao1-train --data "$DATA" --out "$TRAIN" --init shapes-tiny \
    --precision fp32 --lr 3e-4 --max-steps "$MAX_STEPS" --batch-size 16 --max-length 1024 --length-split "$SPLIT" \
    --pretrain-vision-steps "$VISION_STEPS" --freeze-vision --save-every 250 --log-every 25 --seed 0 $RESUME
stamp "main stage done (tower pretraining included): $TRAIN"
FINAL="$TRAIN/final"

# Steps 3-6: fine-tunes of everything but the frozen tower, at the same learning rate.
# finetune FROM DATA OUT STEPS SPLIT
finetune() {
    local resume=""; [ -d "$3/checkpoints" ] && resume=--resume
    [ -f "$3/final/model.safetensors" ] || llavao1-train --model "$1" --data "$2" --out "$3" --full --freeze-vision \
        --lr 3e-4 --max-steps "$4" --batch-size 16 --max-length 1024 --length-split "$5" --save-every 250 --log-every 50 \
        --seed 0 $resume
}
if [ "$CAPTION_STEPS" != 0 ]; then
    finetune "$FINAL" "$RUN/data/train-captions" "$RUN/train-captions" "$CAPTION_STEPS" "$SPLIT"
    stamp "caption fine-tune done: $RUN/train-captions"
    finetune "$RUN/train-captions/final" "$MIX" "$RUN/train-mix" "$MIX_STEPS" "$MIX_SPLIT"
    stamp "mix fine-tune done: $RUN/train-mix"
    finetune "$RUN/train-mix/final" "$RUN/data/train-colour-drills" "$RUN/train-colour-drills" "$COLOUR_DRILL_STEPS" "$MIX_SPLIT"
    stamp "colour drills done: $RUN/train-colour-drills"
    finetune "$RUN/train-colour-drills/final" "$MIX" "$RUN/train-repair" "$REPAIR_STEPS" "$MIX_SPLIT"
    stamp "repair fine-tune done: $RUN/train-repair"
    FINAL="$RUN/train-repair/final"
fi

GGUF="$RUN/gguf-$VARIANT"
llavao1-export gguf --model "$FINAL" --out "$GGUF" --outtype f32
llavao1-export gguf --model "$FINAL" --out "$GGUF" --outtype f16
llavao1-export verify --model "$FINAL" --gguf "$GGUF/final-f32.gguf" --mmproj "$GGUF/mmproj-final-f32.gguf" \
    | tee "$GGUF/verify.txt"
for q in Q8_0 Q6_K Q5_K_M Q4_K_M Q3_K_M Q2_K; do
    llavao1-export quantize "$GGUF/final-f16.gguf" "$GGUF/final-$q.gguf" --type "$q"
done
llavao1-export quantize "$GGUF/mmproj-final-f16.gguf" "$GGUF/mmproj-final-Q8_0.gguf" --type Q8_0
stamp "exported, verified and quantized: $GGUF"
echo "done: $GGUF (the package ships final-f16.gguf, final-Q4_K_M.gguf and mmproj-final-f16.gguf as shapes-tiny-*)"
