"""Fill a candidate tree with tokens: node (i1, ..., id) gets rank i_d of head d's top-k."""

from __future__ import annotations

import torch
from torch import Tensor

from vllm_medusa.tree import TreeSpec


def fill_tree(tree: TreeSpec, root_tokens: Tensor, topk_tokens: Tensor) -> Tensor:
    """Tokens of every tree position, for a whole batch in one gather.

    root_tokens: [B] last emitted token of each request.
    topk_tokens: [B, K, k] head d's top-k token ids at [:, d-1]; needs K >= tree.max_depth, k >= tree.topk.
    Returns [B, N+1] int64: position 0 = root_tokens, position i = topk_tokens[b, depths[i]-1, ranks[i]].
    """
    if topk_tokens.dim() != 3:
        raise ValueError(f"topk_tokens must be [batch, heads, k], got shape {list(topk_tokens.shape)}")
    batch, heads, k = topk_tokens.shape
    if heads < tree.max_depth or k < tree.topk:
        raise ValueError(
            f"the tree needs {tree.max_depth} heads with top-{tree.topk} tokens, "
            f"got top-{k} tokens from {heads} heads"
        )
    if root_tokens.shape != (batch,):
        raise ValueError(f"root_tokens must be [{batch}] to match topk_tokens, got shape {list(root_tokens.shape)}")
    # Flattening (head, rank) lets one index_select serve every request.
    flat_index = ((tree.depths[1:] - 1) * k + tree.ranks[1:]).to(topk_tokens.device)  # [N]
    nodes = topk_tokens.reshape(batch, heads * k).index_select(1, flat_index)  # [B, N]
    return torch.cat([root_tokens.reshape(batch, 1), nodes], dim=1).long()
