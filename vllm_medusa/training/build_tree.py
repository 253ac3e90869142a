"""`vllm-medusa build-tree`: measure the heads' top-k accuracies on held-out data, build a sparse tree.

Rank r of head d is right with probability acc[d, r] (measured on the held-out split of the distilled
ShareGPT data, never on MT-Bench); a node's chance to be accepted is about the product of the accuracies along
its path, and the tree of N nodes with the largest sum of those products is built greedily (design.md).
The tree goes into the heads' config.json; accuracies and the expected tau of several sizes go into
accuracy.json beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vllm_medusa.training.data import HELDOUT_FILE, IGNORE_INDEX, find_split
from vllm_medusa.training.hidden import TokenSet

REPORT_SIZES = (4, 16, 32, 64)


def coverage(heads: Any, tokens: TokenSet) -> float | None:
    """Fraction of held-out targets a truncated-vocabulary head can output at all (None: full vocabulary)."""
    token_map = heads.token_map
    if token_map is None:
        return None
    valid = tokens.targets[tokens.targets != IGNORE_INDEX]
    return float(torch.isin(valid, token_map.cpu()).double().mean()) if len(valid) else None


def evaluate(heads: Any, tokens: TokenSet, topk: int, sizes: Sequence[int] = REPORT_SIZES) -> dict[str, Any]:
    """Per-head top-1 / top-5 accuracy, per-rank accuracies, and the expected tau of greedy trees by size."""
    from vllm_medusa.training.losses import rank_accuracies
    from vllm_medusa.tree import build_sparse_tree, expected_accept_length

    acc = rank_accuracies(heads, tokens.hidden, tokens.targets, topk)
    capacity = sum(topk**d for d in range(1, acc.shape[0] + 1))
    tau = {str(n): round(expected_accept_length(build_sparse_tree(acc, n), acc), 4) for n in sizes if n <= capacity}
    return {
        "heldout_positions": len(tokens),
        "top1": [round(float(a), 4) for a in acc[:, 0]],
        "top5": [round(float(a), 4) for a in acc[:, :5].sum(-1)],
        "coverage": coverage(heads, tokens),
        "tau": tau,
        "rank_accuracies": acc.tolist(),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-medusa build-tree", description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", required=True, type=Path, help="heads directory (its config.json gets the tree)")
    p.add_argument("--model", default="smollm2", help="the backbone the heads read (HF dir / name, or 'smollm2')")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="held-out JSONL, or a distill output dir")
    source.add_argument("--accuracies", type=Path,
                        help="reuse measured accuracies: a metrics.json (train) or accuracy.json (build-tree)")
    p.add_argument("--num-nodes", type=int, default=64)
    p.add_argument("--topk", type=int, default=10, help="ranks per head considered")
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--hidden-batch-tokens", type=int, default=16384)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None)
    return p


def measure(heads: Any, args: argparse.Namespace) -> dict[str, Any]:
    """evaluate() on the held-out chats of args.data, through the backbone args.model."""
    from vllm_medusa.training.backbone import load_model, load_tokenizer, pick_device, pick_dtype
    from vllm_medusa.training.hidden import collect
    from vllm_medusa.training.train import encode_file

    data = find_split(args.data, HELDOUT_FILE) if args.data.is_dir() else args.data
    if data is None:
        raise SystemExit(f"build-tree: {args.data} has no {HELDOUT_FILE}(.gz)")
    if "mt_bench" in data.name:
        raise SystemExit("build-tree: MT-Bench is the evaluation set; measure accuracies on held-out training data")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model = load_model(args.model, dtype, device)
    tokenizer = load_tokenizer(args.model, dtype)
    sequences = encode_file(tokenizer, data, args.max_len)
    tokens = collect(model, sequences, heads.config.num_heads, args.hidden_batch_tokens, tokenizer.pad_token_id)
    saved_dtype = next(heads.parameters()).dtype
    report = evaluate(heads.to(device, torch.float32), tokens, args.topk)
    heads.to("cpu", saved_dtype)
    return {**report, "data": str(data)}


def main(argv: Sequence[str]) -> int:
    from vllm_medusa.checkpoint import load_heads, save_heads
    from vllm_medusa.tree import build_sparse_tree, expected_accept_length

    args = _parser().parse_args(list(argv))
    heads, config = load_heads(args.heads)
    if args.accuracies is not None:
        report = json.loads(args.accuracies.read_text())
        report["accuracies_from"] = str(args.accuracies)
    else:
        report = measure(heads, args)
    acc = torch.tensor(report["rank_accuracies"])
    tree = build_sparse_tree(acc, args.num_nodes)
    report.update({"num_nodes": args.num_nodes, "tree_tau": expected_accept_length(tree, acc), "tree": tree.to_json()})
    save_heads(heads, args.heads, tree=tree, config=config)  # keeps the stored acceptance defaults
    (args.heads / "accuracy.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"top1 {report['top1']}\ntop5 {report['top5']}\ncoverage {report['coverage']}\ntau {report['tau']}")
    print(f"wrote a {args.num_nodes}-node tree (expected tau {report['tree_tau']:.3f}) to {args.heads}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
