"""A proposer that drafts the base model's own top-k, for tests of sampled (temperature > 0) decoding.

For each history in its table, head d's k tokens are the base model's top-k after that history extended
by the base model's greedy continuation of d - 1 tokens; the table is computed by the test with
transformers in float32 (`draft_table`). Other histories get filler tokens (in practice never accepted).
The tree is a deterministic function of the tokens so far, so lossless acceptance must keep the base
distribution exactly, while the sampled tokens are often in the tree (acceptance at depth >= 2).
Configured through a JSON file named by $MEDUSA_TOPK_FILE: {"drafts": {"id,id,...": [[k ids] per head]}}.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

TOPK_ENV = "MEDUSA_TOPK_FILE"


def history_key(history: Sequence[int]) -> str:
    return ",".join(str(int(t)) for t in history)


class TableProposer:
    def __init__(self, vocab_size: int) -> None:
        data = json.loads(Path(os.environ[TOPK_ENV]).read_text())
        self.drafts = {key: torch.tensor(heads) for key, heads in data["drafts"].items()}
        self.vocab_size = vocab_size

    def __call__(self, hidden: torch.Tensor, history: list[np.ndarray], num_heads: int, k: int) -> torch.Tensor:
        # Filler: the last ids of the vocabulary (rare tokens), distinct per head and rank.
        filler = self.vocab_size - 1 - torch.arange(num_heads * k).view(num_heads, k)
        rows = []
        for h in history:
            known = self.drafts.get(history_key(h))
            rows.append(filler if known is None else known[:num_heads, :k])
        return torch.stack(rows)


def make_proposer(vllm_config) -> TableProposer:
    return TableProposer(vllm_config.model_config.get_vocab_size())


@torch.no_grad()
def next_token_logits(model, sequences: list[list[int]]) -> torch.Tensor:
    """[B, V] float32 logits of the token after each sequence (one left-padded batch)."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits
    return logits[:, -1].float()


def draft_table(model, histories: list[list[int]], num_heads: int, k: int) -> dict[str, list[list[int]]]:
    """history key -> [num_heads][k] base top-k along the base model's greedy continuation."""
    sequences = [list(h) for h in histories]
    heads = []
    for _ in range(num_heads):
        top = next_token_logits(model, sequences).topk(k, dim=-1).indices  # [B, k]
        heads.append(top)
        sequences = [s + [int(t)] for s, t in zip(sequences, top[:, 0])]
    stacked = torch.stack(heads, dim=1)  # [B, num_heads, k]
    return {history_key(h): stacked[row].tolist() for row, h in enumerate(histories)}
