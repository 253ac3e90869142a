"""Label shifts, loss weights and accuracies against hand computations."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from vllm_medusa.heads import MedusaHeads
from vllm_medusa.training.data import IGNORE_INDEX as X
from vllm_medusa.training.losses import (
    head_targets,
    loss_weights,
    medusa_loss,
    rank_accuracies,
    to_head_vocab,
    vocab_lookup,
)


def test_head_k_targets_token_t_plus_k_plus_1() -> None:
    labels = torch.tensor([[X, X, 10, 11, 12, 13]])
    targets = head_targets(labels, num_heads=2)
    # head 1 at t reads labels[t+2], head 2 reads labels[t+3]; ignored past the end
    assert targets[0, :, 0].tolist() == [10, 11, 12, 13, X, X]
    assert targets[0, :, 1].tolist() == [11, 12, 13, X, X, X]


def test_loss_is_sum_of_decayed_per_head_cross_entropies() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5)  # K=3 heads, N=4 positions, V'=5
    targets = torch.tensor([[1, 2, X], [0, X, X], [4, 4, 4], [X, X, X]])
    loss, per_head = medusa_loss(logits, targets)
    expected_ce = []
    for k in range(3):
        rows = [(n, int(targets[n, k])) for n in range(4) if targets[n, k] != X]
        nll = [-F.log_softmax(logits[k, n], -1)[t].item() for n, t in rows]
        expected_ce.append(sum(nll) / len(nll))
    assert torch.allclose(per_head, torch.tensor(expected_ce), atol=1e-6)
    expected = sum(0.8 ** (k + 1) * ce for k, ce in enumerate(expected_ce))
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert torch.allclose(loss_weights(3), torch.tensor([0.8, 0.64, 0.512]))


def test_truncated_vocabulary_maps_targets_and_ignores_missing_tokens() -> None:
    lookup = vocab_lookup(torch.tensor([7, 3, 9]), vocab_size=10)
    targets = torch.tensor([[3, 9], [5, X]])
    assert to_head_vocab(targets, lookup).tolist() == [[1, 2], [X, X]]


def test_rank_accuracies_count_per_rank_in_full_vocabulary() -> None:
    heads = MedusaHeads(hidden_size=2, vocab_size=4, num_heads=1, token_map=torch.tensor([0, 2, 3]))
    with torch.no_grad():
        heads.lm_head.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]]))  # rows: tokens 0, 2, 3
    hidden = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [1.0, 0.0]])
    # top-2 tokens: [0, 3], [2, 3], [2, 3], [0, 3]; token 1 is outside the map: always a miss
    targets = torch.tensor([[0], [3], [1], [X]])
    acc = rank_accuracies(heads, hidden, targets, topk=2)
    assert torch.allclose(acc, torch.tensor([[1 / 3, 1 / 3]], dtype=torch.float64))
