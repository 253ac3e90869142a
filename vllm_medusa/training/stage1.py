"""Medusa-1: heads trained on a frozen backbone's hidden states, loss sum_k 0.8**k * CE_k."""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from vllm_medusa.training.backbone import lm_head_weight, load_model, load_tokenizer, pick_dtype
from vllm_medusa.training.hidden import TokenSet, cached_collect
from vllm_medusa.training.losses import medusa_loss, to_head_vocab, top1_hits, vocab_lookup
from vllm_medusa.training.runtime import (
    Runtime, cosine_with_warmup, load_checkpoint, optimizer_step, save_checkpoint,
)
from vllm_medusa.training.train import build_heads, data_files, encode_file, save_outputs


def fit(heads: torch.nn.Module, tokens: TokenSet, args: argparse.Namespace, rt: Runtime) -> dict[str, Any]:
    """AdamW with warm-up + cosine over shuffled positions; each rank takes its slice of every global batch."""
    from tqdm import tqdm

    heads.to(rt.device).train()
    model = torch.nn.parallel.DistributedDataParallel(heads) if rt.world > 1 else heads
    lookup = vocab_lookup(heads.token_map, heads.config.vocab_size)
    lookup = lookup.to(rt.device) if lookup is not None else None
    hidden, targets = tokens.hidden.to(rt.device), tokens.targets.to(rt.device)
    per_step = args.batch_tokens * args.grad_accum * rt.world
    steps_per_epoch = max(1, math.ceil(len(tokens) / per_step))
    total = max(1, round(args.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(heads.parameters(), lr=args.lr, weight_decay=0.0)
    scheduler = cosine_with_warmup(optimizer, int(args.warmup_ratio * total), total)
    step = load_checkpoint(args.out, heads, optimizer, scheduler) if args.resume else 0
    bar = tqdm(total=total, initial=step, desc="medusa-1", disable=not rt.main)
    while step < total:
        epoch, within = divmod(step, steps_per_epoch)
        # the order depends only on (seed, epoch): a resumed run sees the same batches
        order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(args.seed + epoch)).to(rt.device)
        hits = counts = 0
        for micro in range(args.grad_accum):
            start = within * per_step + (micro * rt.world + rt.rank) * args.batch_tokens
            index = order[start : start + args.batch_tokens]
            if len(index) == 0:
                continue
            head_targets = to_head_vocab(targets[index], lookup)
            with rt.autocast():
                logits = model(hidden[index].float())
            loss, _ = medusa_loss(logits, head_targets)
            (loss / args.grad_accum).backward()
            batch_hits, batch_counts = top1_hits(logits.detach(), head_targets)
            hits, counts = hits + batch_hits, counts + batch_counts
        optimizer_step(optimizer, scheduler, args.max_grad_norm)
        step += 1
        top1 = (hits / counts.clamp(min=1)).tolist() if torch.is_tensor(counts) else []
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", top1="/".join(f"{a:.2f}" for a in top1))
        if rt.main and args.save_every and (step % args.save_every == 0 or step == total):
            save_checkpoint(args.out, step, heads, optimizer, scheduler)
    bar.close()
    heads.eval()
    return {"steps": total, "train_positions": len(tokens)}


def backbone_tokens(model: Any, model_name: str, pad_id: int, sequences: list, name: str,
                    args: argparse.Namespace, rt: Runtime) -> TokenSet:
    """Hidden states and targets of one split, through the cache when --cache-dir is given."""
    cache = args.cache_dir / name if args.cache_dir is not None else None

    def collect() -> TokenSet:
        return cached_collect(model, model_name, sequences, args.num_heads, args.hidden_batch_tokens, pad_id, cache)

    tokens = collect() if rt.main or cache is None else None
    rt.barrier()  # with a cache, the other ranks read what rank 0 wrote
    return tokens if tokens is not None else collect()


def run(args: argparse.Namespace, rt: Runtime) -> dict[str, Any]:
    dtype = pick_dtype(args.dtype, rt.device)
    model = load_model(args.model, dtype, rt.device)
    tokenizer = load_tokenizer(args.model, dtype)
    train_file, heldout_file = data_files(args.data)
    splits = {"train": encode_file(tokenizer, train_file, args.max_len)}
    if heldout_file is not None:
        splits["heldout"] = encode_file(tokenizer, heldout_file, args.max_len)
    heads = build_heads(args, lm_head_weight(model), splits["train"])
    tokens = {name: backbone_tokens(model, args.model, tokenizer.pad_token_id, sequences, name, args, rt)
              for name, sequences in splits.items()}
    del model  # the backbone is no longer needed: all it gives the heads is cached
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
    extra = fit(heads, tokens["train"], args, rt)
    return save_outputs(heads, tokens.get("heldout"), args, rt, {"stage": 1, **extra})
