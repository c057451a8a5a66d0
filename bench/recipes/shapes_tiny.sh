#!/usr/bin/env bash
# Every number of docs/shapes-tiny.md, from the run folder train/recipes/shapes_tiny.sh made.
#
#   bash bench/recipes/shapes_tiny.sh [RUN_DIR] [OUT_DIR]
#
# OUT_DIR defaults to RUN_DIR/bench. Evaluation questions come from seeds 5002 (500) and 5003 (1,500);
# training uses seed 1, and seeds >= 5000 are never trained on. Each step is skipped when its output
# exists, so a stopped run continues where it stopped. BENCH_CONFIRM=0 skips step 5 (~50 minutes on 2 cores).
set -euo pipefail
RUN=${1:-runs/shapes-tiny}
OUT=${2:-$RUN/bench}
G="$RUN/gguf-structured"
MODEL=(--model "$G/final-f16.gguf" --mmproj "$G/mmproj-final-f16.gguf")
EVAL="$RUN/data/eval-5002"
mkdir -p "$OUT"
[ -f "$EVAL/records.jsonl" ] || llavao1-data shapes --out "$EVAL" --n 500 --seed 5002 --split eval --kinds cot -q
# once FILE CMD...: run CMD into FILE (through FILE.tmp, so a stopped run leaves no half-written file) unless it exists
once() { local f=$1; shift; [ -f "$f" ] || { "$@" > "$f.tmp" && mv "$f.tmp" "$f"; }; }

# 1. search settings (F16 text and projector) and 2. quantization (greedy), side by side, one thread each
llavao1-bench sweep --data "$EVAL/records.jsonl" --gguf "$G/final-f16.gguf" --mmproj "$G/mmproj-final-f16.gguf" \
    --quants F16 --mmproj-quants F16 --threads 1 --out "$OUT/search" -q \
    --search greedy,stage:2:judge,stage:4:judge,stage:4:judge+nocheck,best-of-n:4:judge,stage:4:logprob,best-of-n:4:vote &
SEARCH=$!
llavao1-bench sweep --data "$EVAL/records.jsonl" --gguf "$G/final-f16.gguf" --mmproj "$G/mmproj-final-f16.gguf" \
    --quants F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K --mmproj-quants F16,Q8_0 --search greedy --threads 1 \
    --out "$OUT/quant" -q &
QUANT=$!
wait $SEARCH
wait $QUANT

# 3. structured against direct answers (train/recipes/shapes_tiny.sh RUN direct), the same questions
D="$RUN/gguf-direct"
once "$OUT/accuracy_greedy.json" llavao1-bench accuracy "${MODEL[@]}" --data "$EVAL/records.jsonl" --search greedy --json -q
if [ -f "$D/final-f16.gguf" ]; then
    once "$OUT/accuracy_direct_f16.json" llavao1-bench accuracy --model "$D/final-f16.gguf" \
        --mmproj "$D/mmproj-final-f16.gguf" --data "$EVAL/records.jsonl" --search greedy --json -q
    once "$OUT/direct_vs_structured.txt" llavao1-bench compare "$OUT/accuracy_direct_f16.json" "$OUT/accuracy_greedy.json"
fi

# 4. speed: the search against greedy (timed right after each run) and against the paper-style implementation
for s in greedy stage:2:judge stage:4:judge stage:4:logprob; do
    once "$OUT/latency_$(echo "$s" | tr ':+' '__').json" llavao1-bench latency "${MODEL[@]}" --limit 8 --repeats 2 \
        --search "$s" --json -q $([ "$s" = greedy ] || echo --compare-greedy) \
        $([ "${s#stage:*:}" = judge ] && echo --compare-reference)
done

# 5. the search against greedy and the quantization sweep once more, on 1,500 questions of their own:
# on 500, a 2-point gap is within chance (llavao1-bench compare prints McNemar's p)
if [ "${BENCH_CONFIRM:-1}" != 0 ]; then
    CONFIRM="$RUN/data/eval-5003"
    [ -f "$CONFIRM/records.jsonl" ] || llavao1-data shapes --out "$CONFIRM" --n 1500 --seed 5003 --split eval --kinds cot -q
    mkdir -p "$OUT/confirm"
    for s in greedy stage:4:logprob stage:4:judge stage:4:judge+swap; do
        f="$OUT/confirm/accuracy_$(echo "$s" | tr ':+' '__').json"
        once "$f" llavao1-bench accuracy "${MODEL[@]}" --data "$CONFIRM/records.jsonl" --search "$s" --threads 2 --json -q
        [ "$s" = greedy ] || once "${f%.json}_vs_greedy.txt" llavao1-bench compare "$OUT/confirm/accuracy_greedy.json" "$f"
    done
    [ -f "$OUT/confirm/quant/results.json" ] || llavao1-bench sweep --data "$CONFIRM/records.jsonl" \
        --gguf "$G/final-f16.gguf" --mmproj "$G/mmproj-final-f16.gguf" --quants F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K \
        --mmproj-quants F16 --search greedy --threads 2 --out "$OUT/confirm/quant" -q
fi
cp "$G/verify.txt" "$OUT/verify.txt"
cp "$RUN/times.txt" "$OUT/times.txt"
echo "done: $OUT"
