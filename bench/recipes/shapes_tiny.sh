#!/usr/bin/env bash
# Every number of the README's results section, from the run folder train/recipes/shapes_tiny.sh made.
#
#   bash bench/recipes/shapes_tiny.sh [RUN_DIR] [OUT_DIR]
#
# Eval questions come from seed 5002 (training uses seed 1; eval seeds >= 5000 are never trained on).
# Each step is skipped when its output exists, so a stopped run continues where it stopped.
set -euo pipefail
RUN=${1:-runs/shapes-tiny}
OUT=${2:-bench/results/shapes-tiny}
N=${BENCH_N:-500}
G="$RUN/gguf-structured"
EVAL="$RUN/data/eval-5002"
mkdir -p "$OUT"
[ -f "$EVAL/records.jsonl" ] || llavao1-data shapes --out "$EVAL" --n "$N" --seed 5002 --split eval --kinds cot
# 1 and 2 run side by side, one thread each (a 7M-parameter model gains little from a second thread).
# 1. search settings on the F16 model: greedy, stage N=2/4 (judge; N=4 also without the reasoning check),
# best-of-N 4, the logprob and vote selectors
llavao1-bench sweep --data "$EVAL/records.jsonl" --gguf "$G/final-f16.gguf" --mmproj "$G/mmproj-final-f16.gguf" \
    --quants F16 --mmproj-quants F16 --threads 1 \
    --search greedy,stage:2,stage:4,stage:4+nocheck,best-of-n:4,stage:4:logprob,best-of-n:4:vote --out "$OUT/search" -q &
SEARCH=$!
# 2. quantization: F16 ... Q2_K text x F16 / Q8_0 projector, greedy
llavao1-bench sweep --data "$EVAL/records.jsonl" --gguf "$G/final-f16.gguf" --mmproj "$G/mmproj-final-f16.gguf" \
    --quants F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K --mmproj-quants F16,Q8_0 --search greedy --threads 1 \
    --out "$OUT/quant" -q &
QUANT=$!
wait $SEARCH
wait $QUANT
# once FILE CMD...: run CMD into FILE (through FILE.tmp, so a stopped run leaves no half-written file) unless it exists
once() { local f=$1; shift; [ -f "$f" ] || { "$@" > "$f.tmp" && mv "$f.tmp" "$f"; }; }
# 3. the direct-answer variant (train/recipes/shapes_tiny.sh RUN direct), same questions
D="$RUN/gguf-direct"
if [ -f "$D/final-f16.gguf" ]; then
    once "$OUT/accuracy_direct_f16.json" llavao1-bench accuracy --model "$D/final-f16.gguf" \
        --mmproj "$D/mmproj-final-f16.gguf" --data "$EVAL/records.jsonl" --search greedy --json -q
fi
# 4. latency of the search against greedy and against the paper-style implementation (shipped examples),
# with llama.cpp's flash attention left to llama.cpp (auto: on for CPU) and off
latency() { once "$1" llavao1-bench latency --model "$G/final-f16.gguf" --mmproj "$G/mmproj-final-f16.gguf" \
    --limit 8 --repeats 2 --json -q "${@:2}"; }
for fa in auto off; do
    for s in greedy stage:2 stage:4; do
        latency "$OUT/latency_${s/:/_}$([ "$fa" = auto ] || echo "_fa-$fa").json" --search "$s" --flash-attn "$fa" \
            $([ "$s" = greedy ] || echo --compare-reference --compare-greedy)
    done
done
# 4b. the settings without a judge, the judge both orders, the judge without the reasoning check and without
# verdict drafts, against greedy timed right after each run (paired, as in 4)
for s in stage:4:logprob stage:2:logprob+greedy stage:4:logprob+greedy stage:4+greedy+swap stage:4+nocheck stage:4+nodraft; do
    latency "$OUT/latency_extra_$(echo "$s" | tr ':+' '__').json" --search "$s" --compare-greedy
done
# 5. stage search with greedy decoding as candidate 1 (+greedy), and with the judge asked both orders (+swap);
# per-question results (failures) of greedy too, for the paired comparison; greedy's also checks the captions.
# Two lanes side by side, one thread each, the most telling settings first.
accuracy() { once "$OUT/accuracy_$(echo "$1" | tr ':+' '__').json" llavao1-bench accuracy --model "$G/final-f16.gguf" \
    --mmproj "$G/mmproj-final-f16.gguf" --data "$EVAL/records.jsonl" --search "$1" --threads 1 --json -q; }
# BENCH_EXTRAS=0 runs greedy alone here (the slowest step: seven stage-search settings over every question).
if [ "${BENCH_EXTRAS:-1}" = 0 ]; then
    accuracy greedy
else
    (for s in greedy stage:4+greedy+swap stage:4+swap; do accuracy "$s"; done) &
    LANE=$!
    for s in stage:4:logprob+greedy stage:2:logprob+greedy stage:4+greedy stage:2+greedy+swap; do accuracy "$s"; done
    wait $LANE
fi
# 6. the search against greedy once more, on 1,500 questions of their own (seed 5003): on 500 a 2-point gap is
# within chance (llavao1-bench compare prints McNemar's p). BENCH_CONFIRM=0 skips it (~37 minutes on 2 cores).
if [ "${BENCH_CONFIRM:-1}" != 0 ]; then
    CONFIRM="$RUN/data/eval-5003"
    [ -f "$CONFIRM/records.jsonl" ] || llavao1-data shapes --out "$CONFIRM" --n 1500 --seed 5003 --split eval --kinds cot -q
    mkdir -p "$OUT/confirm"
    for s in greedy stage:4:logprob stage:4 stage:4+swap; do
        f="$OUT/confirm/accuracy_$(echo "$s" | tr ':+' '__').json"
        once "$f" llavao1-bench accuracy --model "$G/final-f16.gguf" --mmproj "$G/mmproj-final-f16.gguf" \
            --data "$CONFIRM/records.jsonl" --search "$s" --threads 2 --json -q
        [ "$s" = greedy ] || once "${f%.json}_vs_greedy.txt" llavao1-bench compare "$OUT/confirm/accuracy_greedy.json" "$f"
    done
    # the quantization sweep's text models on these questions too (~12 minutes): on 500, 2 points is within chance
    [ -f "$OUT/confirm/quant/results.json" ] || llavao1-bench sweep --data "$CONFIRM/records.jsonl" \
        --gguf "$G/final-f16.gguf" --mmproj "$G/mmproj-final-f16.gguf" --quants F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K \
        --mmproj-quants F16 --search greedy --threads 2 --out "$OUT/confirm/quant" -q
fi
cp "$G/verify.txt" "$OUT/verify.txt"
cp "$RUN/train-structured/log.jsonl" "$OUT/train_log.jsonl"
for stage in captions mix colour-drills repair; do  # the recipe's fine-tunes after the main stage, when it ran them
    [ ! -f "$RUN/train-$stage/log.jsonl" ] || cp "$RUN/train-$stage/log.jsonl" "$OUT/train_log_$stage.jsonl"
done
if [ -f "$D/verify.txt" ]; then cp "$RUN/train-direct/log.jsonl" "$OUT/train_log_direct.jsonl"; cp "$D/verify.txt" "$OUT/verify_direct.txt"; fi
echo "done: $OUT"
