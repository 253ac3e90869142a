"""Heads' accuracy and expected tau on MT-Bench answers, without vLLM (runs on the GPU machine or a CPU).

The backbone answers both turns of the 80 questions greedily (128 new tokens per turn; turn 2 sees turn 1's
answer); the heads then read the backbone's hidden states along those answers. Reported per head: top-1 and
top-5 accuracy; per tree size: the expected tau of the greedy sparse tree built from these accuracies
(design.md: 1 + sum over nodes of the product of accuracies along the path). A Medusa-2 model is measured on
its own answers (`--model` = its backbone). This is the evaluation set: nothing here trains or builds a tree.

    python -m benchmarks.mtbench_heads --heads DIR [--model BACKBONE] [--out report.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch


def answer_mtbench(model, tokenizer, max_tokens: int) -> list[list[dict[str, str]]]:
    """Both turns of every question answered greedily by `model`: 80 chats of 4 messages."""
    from vllm_medusa.mtbench import load_mtbench
    from vllm_medusa.training.distill import generate_tokens

    questions = load_mtbench()
    chats = [[{"role": "user", "content": q.turns[0]}] for q in questions]
    for turn in range(2):
        if turn:
            for chat, q in zip(chats, questions):
                chat.append({"role": "user", "content": q.turns[1]})
        answers = generate_tokens(model, tokenizer, chats, max_tokens, batch_size=len(chats))
        for chat, tokens in zip(chats, answers):
            chat.append({"role": "assistant", "content": tokenizer.decode(tokens, skip_special_tokens=True)})
    return chats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", required=True, type=Path)
    p.add_argument("--model", default="smollm2", help="the backbone the heads read (HF dir, or 'smollm2')")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--out", type=Path, default=None, help="write the report here as JSON")
    args = p.parse_args(argv)

    from vllm_medusa.checkpoint import load_heads
    from vllm_medusa.training.backbone import load_model, load_tokenizer, pick_device, pick_dtype
    from vllm_medusa.training.build_tree import evaluate
    from vllm_medusa.training.data import append_jsonl
    from vllm_medusa.training.hidden import collect
    from vllm_medusa.training.train import encode_file

    device = pick_device(None)
    dtype = pick_dtype("auto", device)
    model = load_model(args.model, dtype, device)
    tokenizer = load_tokenizer(args.model, dtype)
    heads, _ = load_heads(args.heads)
    chats = answer_mtbench(model, tokenizer, args.max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mtbench_answers.jsonl"
        append_jsonl(path, ({"messages": chat} for chat in chats))
        sequences = encode_file(tokenizer, path, 4096)
    tokens = collect(model, sequences, heads.config.num_heads, 16384, tokenizer.pad_token_id)
    report = {"heads": str(args.heads), "model": args.model, "questions": len(chats), "turns": 2,
              "max_tokens": args.max_tokens, **evaluate(heads.to(device, torch.float32), tokens, args.topk)}
    report.pop("rank_accuracies")
    print(json.dumps(report, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
