"""Move the accepted path's KV from its tree slots to the slots right after the root, in every layer.

Slot s of a cache is `cache[s // block_size, s % block_size]` of a `[num_blocks, block_size, H_kv, D]` view
(`split_kv_cache` gives K and V of a vLLM 0.32 per-layer cache; FlashAttention's `kv[0]`, `kv[1]`).
Moves of all requests come as two flat slot lists, applied in list order. A slot may be one move's
destination and a later move's source (path (0, 2, 5) moves 2 -> 1, then 5 -> 2), but no source may be an
earlier move's destination: listing each request's path root first guarantees it, since a node's slot never
lies before its depth's. A source of -1 marks padding (fixed-length lists keep a step CUDA-graph capturable).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def compact_kv(caches: Sequence[Tensor], src_slots: Tensor, dst_slots: Tensor) -> None:
    """Copy slot `src_slots[m]` to slot `dst_slots[m]` in every cache, in one Triton launch.

    caches: K and V views `[num_blocks, block_size, H_kv, D]` of all layers, one shape, dtype and strides;
    src_slots, dst_slots: [M] int, on the caches' device (-1 sources are skipped). Element sizes 1, 2, 4.
    """
    _check(caches, src_slots, dst_slots)
    if src_slots.numel() == 0:
        return
    from vllm_medusa.kernels import _triton_kernels  # Triton only when a GPU kernel runs

    _triton_kernels.compact_kv(caches, src_slots, dst_slots)


def compact_kv_reference(caches: Sequence[Tensor], src_slots: Tensor, dst_slots: Tensor) -> None:
    """PyTorch version of `compact_kv`: two index ops per cache (gather, then scatter)."""
    _check(caches, src_slots, dst_slots)
    keep = src_slots >= 0
    src, dst = src_slots[keep].long(), dst_slots[keep].long()
    for cache in caches:
        block_size = cache.shape[1]
        rows = cache[src // block_size, src % block_size]  # a copy: all reads happen before the writes
        cache[dst // block_size, dst % block_size] = rows


def _check(caches: Sequence[Tensor], src_slots: Tensor, dst_slots: Tensor) -> None:
    if not caches:
        raise ValueError("compact_kv needs at least one cache")
    first = caches[0]
    for cache in caches:
        if cache.dim() != 4 or (cache.shape, cache.stride(), cache.dtype) != (first.shape, first.stride(), first.dtype):
            raise ValueError("caches must be [num_blocks, block_size, H_kv, D] views of one shape, dtype and strides")
    if first.stride(-1) != 1 or first.element_size() not in (1, 2, 4):
        raise ValueError("caches need a unit last stride and 1-, 2- or 4-byte elements")
    if src_slots.shape != dst_slots.shape or src_slots.dim() != 1:
        raise ValueError(f"src_slots and dst_slots must be [M], got {list(src_slots.shape)}, {list(dst_slots.shape)}")
