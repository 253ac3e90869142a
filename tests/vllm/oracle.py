"""An oracle proposer for exactness tests: it knows each prompt's true greedy continuation.

It hides the true next tokens at rank `ORACLE_RANK` (a non-first branch) of every head, and fills
the other ranks with wrong tokens, so a correct tree step accepts deep paths (tau >= 2) and any bug
in positions, mask or KV layout shows up as a different output.
Configured through a JSON file named by $MEDUSA_ORACLE_FILE: {"sequences": [[token ids], ...]}
(prompt + reference greedy output of each request).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

ORACLE_RANK = 1


class OracleProposer:
    def __init__(self, vllm_config=None) -> None:
        data = json.loads(open(os.environ["MEDUSA_ORACLE_FILE"]).read())
        self.sequences = [np.asarray(s, dtype=np.int64) for s in data["sequences"]]
        self.vocab = int(data.get("vocab_size", 49152))

    def continuation(self, history: np.ndarray, length: int) -> list[int]:
        for seq in self.sequences:
            if len(seq) > len(history) and np.array_equal(seq[: len(history)], history):
                return seq[len(history) : len(history) + length].tolist()
        return []

    def __call__(self, hidden: torch.Tensor, history: list[np.ndarray], num_heads: int, k: int) -> torch.Tensor:
        rows = len(history)
        # Wrong tokens: deterministic per position, never the true one (checked below).
        topk = (torch.arange(rows * num_heads * k).view(rows, num_heads, k) * 7919 + 13) % self.vocab
        rank = min(ORACLE_RANK, k - 1)  # small trees (adaptive) may use only the top-1
        for r, h in enumerate(history):
            truth = self.continuation(np.asarray(h), num_heads)
            for d, token in enumerate(truth):
                clash = topk[r, d] == token
                topk[r, d][clash] = (token + 1) % self.vocab
                topk[r, d, rank] = token
        return topk


def make_oracle(vllm_config):
    return OracleProposer(vllm_config)
