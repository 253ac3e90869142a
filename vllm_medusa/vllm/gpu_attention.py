"""Tree attention on vLLM's paged KV cache, GPU: vLLM's FlashAttention backend plus the Triton tree kernel.

vLLM's FlashAttention masks causally only. In tree mode this backend lets it do every row as usual (it also
writes every row's K/V into the paged cache), then recomputes the rows of the requests that carry a tree with
`vllm_medusa.kernels.tree_attention`, which reads the same cache through the block table: one launch per
layer for all those requests (their rows gathered into one compact batch), prefill and plain decode rows
left to FlashAttention. Accepted KV moves with `kernels.compact_kv`, one launch for all layers.

Verified where: the kernels against their PyTorch references on an H100 (tests/kernels); the metadata built
here against the CPU path's tree rows on CPU (tests/vllm/test_gpu_seam.py). vLLM cannot be installed on the
GPU machine, so this module has not run end to end: tree mode on a GPU is opt-in
(`{"medusa": {"gpu_tree": true}}`, FLASH_ATTN backend) and refused otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)

from vllm_medusa.kernels import compact_kv, tree_attention
from vllm_medusa.kernels.tree_attention import (
    TreeAttentionMetadata,
    build_tree_attention_metadata,
    select_tree_requests,
    split_kv_cache,
)
from vllm_medusa.vllm.attention import TREE_MODE


@dataclass
class TreeFlashAttentionMetadata(FlashAttentionMetadata):
    tree_rows: torch.Tensor | None = None  # [T'] query rows of the requests with trees
    tree: TreeAttentionMetadata | None = None


class TreeFlashAttentionMetadataBuilder(FlashAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        native = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if not TREE_MODE.enabled or TREE_MODE.num_nodes is None or TREE_MODE.ancestor_mask is None:
            return native
        m = common_attn_metadata
        selected = select_tree_requests(m.query_start_loc_cpu[: m.num_reqs + 1], TREE_MODE.num_nodes[: m.num_reqs])
        if selected is None:
            return native
        device = m.block_table_tensor.device
        index = selected.requests.to(device)
        lengths = selected.query_start_loc[1:] - selected.query_start_loc[:-1]
        tree = build_tree_attention_metadata(
            m.block_table_tensor[index], m.seq_lens[index], selected.query_start_loc.to(device),
            TREE_MODE.num_nodes[selected.requests].to(device), TREE_MODE.ancestor_mask,
            num_heads=self.num_heads_q, num_kv_heads=self.num_heads_kv, max_query_len=int(lengths.max()),
            max_seq_len=m.max_seq_len,
        )
        return TreeFlashAttentionMetadata(**vars(native), tree_rows=selected.rows.to(device), tree=tree)


class TreeFlashAttentionImpl(FlashAttentionImpl):
    registered = False  # this layer's cache is in TREE_MODE.layers (for move_kv)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        tree = getattr(attn_metadata, "tree", None)
        if tree is None:
            return output
        key_cache, value_cache = split_kv_cache(kv_cache, self.head_size)
        rows = attn_metadata.tree_rows
        query_heads = query.view(-1, self.num_heads, self.head_size)[rows]
        output.view(-1, self.num_heads, self.head_size)[rows] = tree_attention(
            query_heads, key_cache, value_cache, tree, self.scale
        )
        return output

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if TREE_MODE.enabled and not self.registered:  # once per layer, not a search per step
            TREE_MODE.layers.append((self, layer, kv_cache))
            self.registered = True

    @staticmethod
    def move_kv(layers: list[tuple[Any, Any, torch.Tensor]], src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """Every layer's K and V in one compaction launch (sources listed root first, see compact_kv)."""
        caches = [half for impl, _, kv_cache in layers for half in split_kv_cache(kv_cache, impl.head_size)]
        device = caches[0].device
        compact_kv(caches, src_slots.to(device), dst_slots.to(device))


class TreeFlashAttentionBackend(FlashAttentionBackend):
    """vLLM's FlashAttention backend, with tree rows recomputed once the runner switches tree mode on."""

    @staticmethod
    def get_impl_cls():
        return TreeFlashAttentionImpl

    @staticmethod
    def get_builder_cls():
        return TreeFlashAttentionMetadataBuilder
