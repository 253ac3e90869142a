"""GPU kernels (Triton) for tree verification, each next to its PyTorch reference.

Pure PyTorch at import time: Triton is imported only when a GPU kernel is launched, so CPU installs never
need it (an installed Triton changes which vLLM model runner is chosen on CPU).
"""

from vllm_medusa.kernels.kv_compaction import compact_kv, compact_kv_reference
from vllm_medusa.kernels.tree_attention import (
    TreeAttentionMetadata,
    build_tree_attention_metadata,
    pack_tree_mask,
    split_kv_cache,
    tree_attention,
    tree_attention_mask,
    tree_attention_reference,
    unpack_tree_mask,
)

__all__ = [
    "TreeAttentionMetadata",
    "build_tree_attention_metadata",
    "compact_kv",
    "compact_kv_reference",
    "pack_tree_mask",
    "split_kv_cache",
    "tree_attention",
    "tree_attention_mask",
    "tree_attention_reference",
    "unpack_tree_mask",
]
