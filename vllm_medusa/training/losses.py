"""What each head must predict, the Medusa loss, and how often the heads are right.

Head k (k = 1..K) reads the hidden state h_t and predicts token t+k+1 (the base LM head predicts t+1), so its
target at position t is labels[t+k+1]; labels are IGNORE_INDEX outside assistant answers, hence a head is
trained only where the token it must predict is an answer token.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from vllm_medusa.training.data import IGNORE_INDEX

DECAY = 0.8  # Medusa's per-head loss weight base: head k weighs DECAY**k


def head_targets(labels: Tensor, num_heads: int) -> Tensor:
    """labels [B, L] -> targets [B, L, K]: targets[b, t, k-1] = labels[b, t+k+1], IGNORE_INDEX past the end."""
    batch, length = labels.shape
    padded = torch.full((batch, length + num_heads + 1), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    padded[:, :length] = labels
    return torch.stack([padded[:, k + 1 : k + 1 + length] for k in range(1, num_heads + 1)], dim=-1)


def vocab_lookup(token_map: Tensor | None, vocab_size: int) -> Tensor | None:
    """[V] full-vocabulary id -> index in the heads' truncated vocabulary, IGNORE_INDEX if absent."""
    if token_map is None:
        return None
    lookup = torch.full((vocab_size,), IGNORE_INDEX, dtype=torch.long, device=token_map.device)
    lookup[token_map] = torch.arange(len(token_map), device=token_map.device)
    return lookup


def to_head_vocab(targets: Tensor, lookup: Tensor | None) -> Tensor:
    """Full-vocabulary targets -> the heads' output indices; tokens outside a truncated vocabulary become
    IGNORE_INDEX (a head cannot learn what it cannot output; accuracies still count them as misses)."""
    if lookup is None:
        return targets
    valid = targets != IGNORE_INDEX
    return torch.where(valid, lookup[targets.clamp(min=0)], IGNORE_INDEX)


def loss_weights(num_heads: int, device: torch.device | None = None) -> Tensor:
    return DECAY ** torch.arange(1, num_heads + 1, dtype=torch.float32, device=device)


def medusa_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """logits [K, N, V'], targets [N, K] in head-vocabulary indices -> (sum_k DECAY**k * CE_k, CE_k [K]).

    CE_k is the mean over positions with a target; a head without any target in the batch contributes 0.
    """
    num_heads = logits.shape[0]
    per_head = []
    for k in range(num_heads):
        total = F.cross_entropy(logits[k].float(), targets[:, k], ignore_index=IGNORE_INDEX, reduction="sum")
        per_head.append(total / (targets[:, k] != IGNORE_INDEX).sum().clamp(min=1))
    ce = torch.stack(per_head)
    return (loss_weights(num_heads, ce.device) * ce).sum(), ce


def top1_hits(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(correct argmax count [K], target count [K]) over positions with a head-vocabulary target."""
    valid = targets.T != IGNORE_INDEX  # [K, N]
    correct = (logits.argmax(-1) == targets.T) & valid
    return correct.sum(-1), valid.sum(-1)


@torch.no_grad()
def rank_accuracies(heads: torch.nn.Module, hidden: Tensor, targets: Tensor, topk: int, batch_size: int = 4096) -> Tensor:
    """accuracies [K, topk]: [d, r] = fraction of positions (with a head-d target) where head d's rank-r token
    is the target; full-vocabulary targets [N, K], so tokens outside a truncated vocabulary count as misses."""
    num_heads = targets.shape[1]
    hits = torch.zeros(num_heads, topk, dtype=torch.float64)
    totals = torch.zeros(num_heads, dtype=torch.float64)
    device = next(heads.parameters()).device
    for start in range(0, len(hidden), batch_size):
        h = hidden[start : start + batch_size].to(device, next(heads.parameters()).dtype)
        t = targets[start : start + batch_size].to(device)
        tokens = heads.topk_tokens(h, topk)  # [B, K, topk]
        valid = t != IGNORE_INDEX  # [B, K]
        hits += ((tokens == t.unsqueeze(-1)) & valid.unsqueeze(-1)).sum(0).double().cpu()
        totals += valid.sum(0).double().cpu()
    return hits / totals.clamp(min=1).unsqueeze(-1)
