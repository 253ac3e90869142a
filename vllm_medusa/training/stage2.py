"""Medusa-2: backbone and heads trained together, loss = base loss + lambda(step) * sum_k 0.8**k * CE_k.

The base loss keeps the backbone's own predictions: KL(original || trained) on self-distilled answers (the
original model is the LoRA backbone with its adapter switched off, or a frozen copy for full fine-tuning),
or next-token cross-entropy on data written by someone else. lambda ramps up along a sine; the heads learn
at a multiple of the backbone's rate and may train alone first (--heads-warmup-steps), so a barely trained
head does not pull the backbone around. Output: heads in --out, the merged backbone in --out/backbone (and
the LoRA adapter in --out/adapter), metrics.json with the drift from the original model.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.nn import functional as F

from vllm_medusa.training.backbone import lm_head_weight, load_model, load_tokenizer
from vllm_medusa.training.data import IGNORE_INDEX, load_chats
from vllm_medusa.training.hidden import collect, last_hidden, pad_batch
from vllm_medusa.training.losses import head_targets, medusa_loss, to_head_vocab, top1_hits, vocab_lookup
from vllm_medusa.training.runtime import (
    Runtime, cosine_with_warmup, load_checkpoint, optimizer_step, save_checkpoint,
)
from vllm_medusa.training.train import Sequences, build_heads, data_files, encode_file, save_outputs


def lambda_schedule(lambda0: float, ramp_steps: int) -> Callable[[int], float]:
    """lambda0 * sin(pi/2 * min(1, (step+1) / ramp_steps)): a smooth start, then constant."""
    return lambda step: lambda0 * math.sin(0.5 * math.pi * min(1.0, (step + 1) / max(1, ramp_steps)))


class Backbone:
    """The model being trained and a way to run the original one (adapter off, or a frozen copy)."""

    def __init__(self, args: argparse.Namespace, rt: Runtime) -> None:
        if args.lora_rank > 0:
            from peft import LoraConfig, get_peft_model

            # frozen base in the fast dtype; peft keeps the adapters in fp32
            base = load_model(args.model, rt.autocast_dtype or torch.float32, rt.device)
            config = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                                target_modules="all-linear")
            self.model = get_peft_model(base, config)
            self.original = None
        else:
            self.model = load_model(args.model, torch.float32, rt.device)
            self.model.requires_grad_(True)
            self.original = load_model(args.model, rt.autocast_dtype or torch.float32, rt.device)
            self.original.requires_grad_(False)

    @contextlib.contextmanager
    def as_original(self) -> Iterator[Any]:
        if self.original is not None:
            yield self.original
        else:
            with self.model.disable_adapter():
                yield self.model

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def next_token_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, L] of positions whose next token is an answer token, those next tokens [M])."""
    following = torch.full_like(labels, IGNORE_INDEX)
    following[:, :-1] = labels[:, 1:]
    mask = following != IGNORE_INDEX
    return mask, following[mask]


def base_loss(backbone: Backbone, hidden: torch.Tensor, ids: torch.Tensor, attention: torch.Tensor,
              labels: torch.Tensor, kind: str) -> torch.Tensor:
    mask, following = next_token_positions(labels)
    logits = backbone.model.get_output_embeddings()(hidden[mask]).float()
    if kind == "ce":
        return F.cross_entropy(logits, following)
    with torch.no_grad(), backbone.as_original() as original:
        reference = original.get_output_embeddings()(last_hidden(original, ids, attention)[mask]).float()
    # KL(original || trained), summed over the vocabulary, mean over positions
    return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(reference, -1), log_target=True, reduction="batchmean")


class Joint(torch.nn.Module):
    """Backbone + heads as one module computing the whole loss, so DistributedDataParallel can wrap it."""

    def __init__(self, backbone: Backbone, heads: torch.nn.Module, base_kind: str) -> None:
        super().__init__()
        self.model, self.heads, self.base_kind = backbone.model, heads, base_kind
        self.backbone = backbone
        lookup = vocab_lookup(heads.token_map, heads.config.vocab_size)
        self.register_buffer("lookup", lookup, persistent=False)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor, attention: torch.Tensor,
                lam: float) -> tuple[torch.Tensor, ...]:
        hidden = last_hidden(self.model, ids, attention)
        base = base_loss(self.backbone, hidden, ids, attention, labels, self.base_kind)
        targets = head_targets(labels, self.heads.config.num_heads)
        keep = (targets != IGNORE_INDEX).any(-1)
        targets = to_head_vocab(targets[keep], self.lookup)
        logits = self.heads(hidden[keep])
        heads_loss, _ = medusa_loss(logits, targets)
        return base + lam * heads_loss, base, heads_loss, logits, targets


def fit(backbone: Backbone, heads: torch.nn.Module, sequences: Sequences, pad_id: int, args: argparse.Namespace,
        rt: Runtime) -> dict[str, Any]:
    from tqdm import tqdm

    joint = Joint(backbone, heads.to(rt.device), args.base_loss).to(rt.device).train()
    per_step = args.batch_size * args.grad_accum * rt.world
    steps_per_epoch = max(1, math.ceil(len(sequences) / per_step))
    total = max(1, round(args.epochs * steps_per_epoch))
    groups = [{"params": backbone.parameters(), "lr": args.lr},
              {"params": list(heads.parameters()), "lr": args.lr * args.heads_lr_mult}]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    scheduler = cosine_with_warmup(optimizer, int(args.warmup_ratio * total), total,
                                   hold_steps=(args.heads_warmup_steps, 0))
    lam = lambda_schedule(args.lambda0, args.lambda_ramp_steps or total // 3)
    step = load_checkpoint(args.out, joint, optimizer, scheduler) if args.resume else 0
    model = torch.nn.parallel.DistributedDataParallel(joint) if rt.world > 1 else joint
    bar = tqdm(total=total, initial=step, desc="medusa-2", disable=not rt.main)
    while step < total:
        epoch, within = divmod(step, steps_per_epoch)
        order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        hits = counts = 0
        for micro in range(args.grad_accum):
            start = within * per_step + (micro * rt.world + rt.rank) * args.batch_size
            batch = [sequences[i] for i in order[start : start + args.batch_size]]
            if not batch:
                continue
            ids, labels, attention = (t.to(rt.device) for t in pad_batch(batch, pad_id))
            with rt.autocast():
                loss, base, heads_loss, logits, targets = model(ids, labels, attention, lam(step))
            (loss / args.grad_accum).backward()
            batch_hits, batch_counts = top1_hits(logits.detach(), targets)
            hits, counts = hits + batch_hits, counts + batch_counts
        optimizer_step(optimizer, scheduler, args.max_grad_norm)
        step += 1
        top1 = (hits / counts.clamp(min=1)).tolist() if torch.is_tensor(counts) else []
        bar.update(1)
        bar.set_postfix(base=f"{base.item():.3f}", heads=f"{heads_loss.item():.3f}", lam=f"{lam(step):.3f}",
                        top1="/".join(f"{a:.2f}" for a in top1))
        if rt.main and args.save_every and (step % args.save_every == 0 or step == total):
            save_checkpoint(args.out, step, joint, optimizer, scheduler)
    bar.close()
    joint.eval()
    return {"steps": total, "train_conversations": len(sequences)}


@torch.no_grad()
def drift(backbone: Backbone, tokenizer: Any, sequences: Sequences, heldout_file: Any, args: argparse.Namespace,
          rt: Runtime) -> dict[str, float]:
    """How far training moved the backbone: KL(original || trained) per answer token on held-out chats, and
    greedy agreement (--drift-tokens new tokens from each first held-out prompt: identical outputs, common
    prefix)."""
    kl_sum, positions = 0.0, 0
    for start in range(0, len(sequences), args.batch_size):
        ids, labels, attention = (t.to(rt.device) for t in pad_batch(sequences[start : start + args.batch_size],
                                                                        tokenizer.pad_token_id))
        with rt.autocast():
            hidden = last_hidden(backbone.model, ids, attention)
            kl = base_loss(backbone, hidden, ids, attention, labels, "kl")
        count = int(next_token_positions(labels)[0].sum())
        kl_sum, positions = kl_sum + float(kl) * count, positions + count
    from vllm_medusa.training.distill import generate_tokens

    prompts = [chat[:1] for chat in load_chats(heldout_file)[: args.drift_prompts]]
    trained = generate_tokens(backbone.model, tokenizer, prompts, args.drift_tokens, len(prompts) or 1)
    with backbone.as_original() as original:
        reference = generate_tokens(original, tokenizer, prompts, args.drift_tokens, len(prompts) or 1)
    same, prefix = 0, 0.0
    for a, b in zip(trained, reference):
        common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same += a == b
        prefix += common / max(1, len(b))
    return {"heldout_kl": kl_sum / max(1, positions), "greedy_identical": same / max(1, len(prompts)),
            "greedy_common_prefix": prefix / max(1, len(prompts))}


def run(args: argparse.Namespace, rt: Runtime) -> dict[str, Any]:
    from vllm_medusa.checkpoint import load_heads

    backbone = Backbone(args, rt)
    tokenizer = load_tokenizer(args.model, rt.autocast_dtype or torch.float32)
    train_file, heldout_file = data_files(args.data)
    train_seqs = encode_file(tokenizer, train_file, args.max_len)
    if args.init_heads is not None:
        heads, _ = load_heads(args.init_heads, dtype=torch.float32)
    else:
        heads = build_heads(args, lm_head_weight(backbone.model), train_seqs)
    extra = fit(backbone, heads, train_seqs, tokenizer.pad_token_id, args, rt)
    heldout = None
    if heldout_file is not None:
        heldout_seqs = encode_file(tokenizer, heldout_file, args.max_len)
        heldout = collect(backbone.model, heldout_seqs, heads.config.num_heads, args.hidden_batch_tokens,
                          tokenizer.pad_token_id)
        extra.update(drift(backbone, tokenizer, heldout_seqs, heldout_file, args, rt))
    metrics = save_outputs(heads, heldout, args, rt, {"stage": 2, **extra})
    if rt.main:
        if args.lora_rank > 0:
            backbone.model.save_pretrained(args.out / "adapter")
            backbone.model = backbone.model.merge_and_unload()
        backbone.model.save_pretrained(args.out / "backbone")
        tokenizer.save_pretrained(args.out / "backbone")
    return metrics
