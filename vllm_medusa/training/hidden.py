"""Frozen-backbone hidden states as a token-level training set, optionally cached in shards on disk.

With the backbone frozen (Medusa-1), a head's input h_t never changes, so the backbone runs once over the
data and training then touches only the heads: epochs cost a few small matmuls per token.
Only positions where at least one head has a target are kept.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from vllm_medusa.training.data import IGNORE_INDEX
from vllm_medusa.training.losses import head_targets

Sequences = Sequence[tuple[list[int], list[int]]]  # (input ids, labels) per conversation


@dataclass
class TokenSet:
    hidden: Tensor  # [N, H] the backbone's last hidden state (after the final norm)
    targets: Tensor  # [N, K] full-vocabulary targets of the K heads, IGNORE_INDEX where none

    def __len__(self) -> int:
        return len(self.hidden)


def pad_batch(sequences: Sequences, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded (input_ids, labels, attention_mask), each [B, L]."""
    length = max(len(ids) for ids, _ in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, (seq_ids, seq_labels) in enumerate(sequences):
        ids[row, : len(seq_ids)] = torch.tensor(seq_ids)
        labels[row, : len(seq_labels)] = torch.tensor(seq_labels)
        mask[row, : len(seq_ids)] = 1
    return ids, labels, mask


def last_hidden(model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """[B, L, H] output of the decoder stack after its final norm: what the LM head (and the heads) read."""
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@torch.no_grad()
def collect(model: Any, sequences: Sequences, num_heads: int, batch_tokens: int, pad_id: int,
            store_dtype: torch.dtype = torch.bfloat16) -> TokenSet:
    """Run the frozen backbone over `sequences` (batches of about batch_tokens tokens, sorted by length)."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    hidden, targets = [], []
    start = 0
    with tqdm(total=len(order), desc="hidden states", unit="seq") as bar:
        while start < len(order):
            end = start + 1  # sorted ascending: the padded size of a batch is count * its last length
            while end < len(order) and (end - start + 1) * len(sequences[order[end]][0]) <= batch_tokens:
                end += 1
            batch = [sequences[i] for i in order[start:end]]
            ids, labels, mask = pad_batch(batch, pad_id)
            h = last_hidden(model, ids.to(device), mask.to(device))
            t = head_targets(labels, num_heads)
            keep = (t != IGNORE_INDEX).any(-1)  # [B, L]
            hidden.append(h[keep.to(device)].to("cpu", store_dtype))
            targets.append(t[keep])
            start = end
            bar.update(len(batch))
    size = model.config.hidden_size
    return TokenSet(torch.cat(hidden) if hidden else torch.empty(0, size, dtype=store_dtype),
                    torch.cat(targets) if targets else torch.empty(0, num_heads, dtype=torch.long))


def cache_key(model_name: str, sequences: Sequences, num_heads: int) -> str:
    """Identifies a cache: same model, same token sequences and labels, same number of heads."""
    digest = hashlib.sha256(f"{model_name}|{num_heads}".encode())
    for ids, labels in sequences:
        digest.update(torch.tensor(ids + labels, dtype=torch.int32).numpy().tobytes())
    return digest.hexdigest()


def save_cache(tokens: TokenSet, directory: Path, key: str, shard_tokens: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    num_shards = 0
    for num_shards, start in enumerate(range(0, len(tokens), shard_tokens), start=1):
        part = {"hidden": tokens.hidden[start : start + shard_tokens].contiguous(),
                "targets": tokens.targets[start : start + shard_tokens].contiguous()}
        save_file(part, str(directory / f"shard-{num_shards - 1:05d}.safetensors"))
    # meta.json last: a cache without it (interrupted write) is recomputed
    (directory / "meta.json").write_text(json.dumps({"key": key, "num_shards": num_shards, "tokens": len(tokens)}))


def load_cache(directory: Path, key: str) -> TokenSet | None:
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    if meta["key"] != key:
        return None
    shards = [load_file(str(directory / f"shard-{i:05d}.safetensors")) for i in range(meta["num_shards"])]
    return TokenSet(torch.cat([s["hidden"] for s in shards]), torch.cat([s["targets"] for s in shards]))


def cached_collect(model: Any, model_name: str, sequences: Sequences, num_heads: int, batch_tokens: int,
                   pad_id: int, cache_dir: Path | None, shard_tokens: int = 1 << 18) -> TokenSet:
    """`collect`, reusing a matching cache in cache_dir (and writing one there when missing)."""
    if cache_dir is None:
        return collect(model, sequences, num_heads, batch_tokens, pad_id)
    key = cache_key(model_name, sequences, num_heads)
    tokens = load_cache(cache_dir, key)
    if tokens is None:
        tokens = collect(model, sequences, num_heads, batch_tokens, pad_id)
        save_cache(tokens, cache_dir, key, shard_tokens)
    return tokens
