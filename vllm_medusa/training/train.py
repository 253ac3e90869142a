"""`vllm-medusa train`: Medusa-1 (`--stage 1`, frozen backbone) or Medusa-2 (`--stage 2`, joint) training.

Reads `train.jsonl` (and `heldout.jsonl`, for the final accuracies) of a `vllm-medusa distill` output, or any
JSONL of `{"messages": [...]}` chats. Writes the heads (vLLM MedusaModel layout, see checkpoint.py),
`metrics.json` (per-head accuracies and expected tau on the held-out split) and `checkpoint.pt` (resume with
--resume). Runs on one CPU or GPU, or under `torchrun` / `accelerate launch` on several GPUs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vllm_medusa.training.data import HELDOUT_FILE, IGNORE_INDEX, TRAIN_FILE, encode_chat, find_split, load_chats
from vllm_medusa.training.runtime import Runtime, init_runtime

Sequences = list[tuple[list[int], list[int]]]


def encode_file(tokenizer: Any, path: Path, max_len: int) -> Sequences:
    """(input ids, labels) of every chat in a JSONL file; chats without any answer token are dropped."""
    encoded = [encode_chat(tokenizer, chat, max_len) for chat in load_chats(path)]
    return [(ids, labels) for ids, labels in encoded if any(label != IGNORE_INDEX for label in labels)]


def frequent_tokens(sequences: Sequences, size: int) -> torch.Tensor:
    """token_map of a truncated-vocabulary head: the `size` most frequent answer tokens, in id order.

    Heads only need to output tokens the model actually says; the answers' frequent tokens cover nearly all.
    """
    counts = Counter(label for _, labels in sequences for label in labels if label != IGNORE_INDEX)
    chosen = sorted(counts, key=lambda token: (-counts[token], token))[:size]
    return torch.tensor(sorted(chosen), dtype=torch.long)


def build_heads(args: argparse.Namespace, lm_head: torch.Tensor, sequences: Sequences) -> Any:
    """Fresh heads: residual blocks zero, output layers copied from the base LM head (design.md)."""
    from vllm_medusa.heads import MedusaHeads

    vocab_size, hidden_size = lm_head.shape
    token_map = frequent_tokens(sequences, args.head_vocab) if 0 < args.head_vocab < vocab_size else None
    heads = MedusaHeads(hidden_size, vocab_size, args.num_heads, num_layers=args.num_layers, bias=True,
                        shared_lm_head=args.shared_lm_head, token_map=token_map)
    heads.init_from_lm_head(lm_head.detach().float().cpu())
    return heads


def save_outputs(heads: Any, heldout: Any, args: argparse.Namespace, rt: Runtime, extra: dict[str, Any]) -> dict[str, Any]:
    """Writes the heads (in --save-dtype) and metrics.json; returns the metrics."""
    from vllm_medusa.checkpoint import save_heads
    from vllm_medusa.training.build_tree import evaluate

    metrics = dict(extra)
    if heldout is not None and len(heldout):
        metrics.update(evaluate(heads, heldout, args.eval_topk))
    if rt.main:
        save_heads(heads.to(getattr(torch, args.save_dtype)), args.out)
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def format_metrics(metrics: dict[str, Any]) -> str:
    lines = [f"{key}: {value}" for key, value in metrics.items() if key in ("top1", "top5", "coverage", "tau")]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-medusa train", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", type=int, choices=(1, 2), required=True)
    p.add_argument("--model", default="smollm2", help="base model: HF dir / name, or 'smollm2'")
    p.add_argument("--data", required=True, type=Path, help="distill output dir, or a train JSONL file")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-layers", type=int, default=1, help="residual blocks per head")
    p.add_argument("--head-vocab", type=int, default=0,
                   help="truncated vocabulary size (token_map of the most frequent answer tokens); 0: full")
    p.add_argument("--shared-lm-head", action="store_true", help="one output layer shared by all heads")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=1e-3, help="heads' lr (stage 1) / backbone's lr (stage 2)")
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--max-len", type=int, default=2048, help="tokens per conversation (longer ones are cut)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", help="backbone dtype: auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16")
    p.add_argument("--device", default=None)
    p.add_argument("--save-every", type=int, default=200, help="optimizer steps between checkpoints (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--save-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--eval-topk", type=int, default=10)
    s1 = p.add_argument_group("stage 1")
    s1.add_argument("--batch-tokens", type=int, default=4096, help="positions per micro-batch")
    s1.add_argument("--cache-dir", type=Path, default=None, help="cache of backbone hidden states (shards)")
    s1.add_argument("--hidden-batch-tokens", type=int, default=16384, help="tokens per backbone forward")
    s2 = p.add_argument_group("stage 2")
    s2.add_argument("--batch-size", type=int, default=8, help="conversations per micro-batch")
    s2.add_argument("--lora-rank", type=int, default=32, help="LoRA rank of the backbone (0: full fine-tuning)")
    s2.add_argument("--heads-lr-mult", type=float, default=4.0, help="heads' lr = this x backbone lr")
    s2.add_argument("--heads-warmup-steps", type=int, default=0, help="steps training only the heads first")
    s2.add_argument("--lambda0", type=float, default=0.2, help="weight of the heads' loss after its ramp")
    s2.add_argument("--lambda-ramp-steps", type=int, default=0, help="sine ramp of lambda0 (0: a third of training)")
    s2.add_argument("--base-loss", choices=("kl", "ce"), default="kl",
                    help="kl: KL(original || trained), for self-distilled data; ce: next-token cross-entropy")
    s2.add_argument("--init-heads", type=Path, default=None, help="start from these (stage 1) heads")
    s2.add_argument("--drift-prompts", type=int, default=32, help="held-out prompts for greedy agreement")
    s2.add_argument("--drift-tokens", type=int, default=128, help="greedy tokens per drift prompt (MT-Bench: 128)")
    return p


def data_files(data: Path) -> tuple[Path, Path | None]:
    """(train file, held-out file or None) of --data: a distill output dir, or one training file."""
    if data.is_file():
        return data, None
    train = find_split(data, TRAIN_FILE)
    if train is None:
        raise ValueError(f"{data} has no {TRAIN_FILE}(.gz)")
    return train, find_split(data, HELDOUT_FILE)


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    torch.manual_seed(args.seed)
    rt = init_runtime(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage == 1:
        from vllm_medusa.training.stage1 import run
    else:
        from vllm_medusa.training.stage2 import run
    metrics = run(args, rt)
    if rt.main:
        print(format_metrics(metrics))
    if rt.world > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
