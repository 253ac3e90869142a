"""Tree attention on vLLM's paged KV cache, CPU.

vLLM's CPU kernel masks causally only, has no log-sum-exp output and packs K/V per ISA inside a
block, so a tree node's attention (prefix + its ancestors) cannot be computed by it or merged with
it. Once the runner switches tree mode on, this backend therefore:

* lets vLLM's native kernel do every row that is exactly causal (prefill, chunked prefill, plain
  decode and tree roots), writing K/V in vLLM's own layout; each tree-node row is handed to it as a
  sequence of its own that reads one key, so the kernel spends next to nothing on rows it would get
  wrong (computed causally, a 16-node tree made its call 3.4x the cost of the root alone at 250
  keys and 6x at 1,000);
* reads each request's K/V for those rows straight from vLLM's cache, whole blocks at a time, where the
  block layout of vLLM's ISA is known (`native_kv`: its "vec" and "vec16" kernels, x86 without AMX);
  elsewhere (amx, neon, ...) from a token-major shadow copy of K/V (`ShadowKV`) written next to the
  native cache, which doubles the KV memory;
* recomputes only the tree-node rows of the step, for all requests in one padded, masked
  `scaled_dot_product_attention` call per layer (the mask is built once per step, shared by all
  layers): the number of attention calls per layer does not grow with the number of requests.

A step without trees (e.g. the adaptive tree chose no speculation) costs what plain vLLM costs, plus
(with a shadow) the shadow write: in eager engines four ops per step for all layers (two stacks, two writes).
When tree mode is off, every method is vLLM's own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_medusa.vllm.settings import engine_runs_trees


# vLLM CPU ISAs whose block layout `native_kv` reads: within a block of a KV head, K transposed
# ([head_size, block_size]) then V token-major ([block_size, head_size]). Checked against vLLM's own writer
# (tests/vllm/test_attention.py); for other ISAs (amx, neon, ...) tree rows read the shadow copy.
NATIVE_LAYOUT_ISAS = frozenset({"vec", "vec16"})


def native_kv(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of vLLM's CPU cache `[num_blocks, kv_heads, block_size, 2 * head_size]` (a `NATIVE_LAYOUT_ISAS`
    layout): K `[num_blocks, kv_heads, head_size, block_size]` and V `[num_blocks, kv_heads, block_size, head_size]`."""
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    halves = kv_cache.view(num_blocks, num_kv_heads, 2, block_size * head_size)
    return (halves[:, :, 0].view(num_blocks, num_kv_heads, head_size, block_size),
            halves[:, :, 1].view(num_blocks, num_kv_heads, block_size, head_size))


@dataclass
class ShadowKV:
    """Token-major copy of every layer's K/V, `[num_layers, num_slots, kv_heads, 2 * head_size]` (K | V).

    Only tree-node rows read it, so in a step with trees each layer's rows must be written before that
    layer's attention. In a step without trees nothing reads it: an eager engine's layers then hold their
    K/V and the whole step is written in four ops (two stacks, two writes) when the next step starts
    (`flush`). Per-op overhead, not bytes, is what 30 layers x 2 small writes cost: 5% of a plain step
    at batch 4 (bf16, 2 cores).
    A compiled engine writes at once: inductor may reuse a K/V buffer once the layer is done with it.
    """

    layer_index: dict[str, int] = field(default_factory=dict)  # attention layer name -> row of `cache`
    may_hold: bool = False  # the model runs eagerly, so held K/V stay intact until the flush
    hold: bool = False  # this step: hold the writes (no tree rows)
    cache: torch.Tensor | None = None
    _step_slots: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None  # (slot_mapping, slots, keep)
    _held: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def layer(self, name: str) -> torch.Tensor:
        """`[num_slots, kv_heads, 2 * head_size]` view of one layer."""
        return self.cache[self.layer_index[name]]

    def slots(self, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(int64 slots, rows to keep or None) of a step's write, worked out once for all layers.

        Padding rows (slot -1) are not cached, as in vLLM's own writer. A copy: vLLM refills its slot
        buffer next step, before held writes are flushed."""
        if self._step_slots is None or self._step_slots[0] is not slot_mapping:
            slots = slot_mapping.to(torch.long, copy=True)
            keep = None
            if bool((slots < 0).any()):
                keep = slots >= 0
                slots = slots[keep]
            self._step_slots = (slot_mapping, slots, keep)
        return self._step_slots[1], self._step_slots[2]

    def write(
        self, name: str, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor, kv_cache: torch.Tensor
    ) -> None:
        """key, value: [T, kv_heads, head_size] rows of one layer; slot_mapping: [T], -1 for padding rows."""
        slots, keep = self.slots(slot_mapping)
        if self.cache is None:
            num_blocks, num_kv_heads, block_size, width = kv_cache.shape
            self.cache = torch.zeros(
                len(self.layer_index), num_blocks * block_size, num_kv_heads, width, dtype=kv_cache.dtype
            )
        if self.hold:
            self._held[self.layer_index[name]] = (key, value)
            return
        if keep is not None:
            key, value = key[keep], value[keep]
        head_size = key.shape[-1]
        cache = self.layer(name)
        # Two writes into the halves instead of a concatenation: per-op overhead is most of this cost.
        cache[..., :head_size].index_copy_(0, slots, key)
        cache[..., head_size:].index_copy_(0, slots, value)

    def flush(self) -> None:
        """Write the held K/V of all layers (one step's), if any."""
        if not self._held:
            return
        assert len(self._held) == len(self.layer_index), "a step's held writes cover every layer"
        _, slots, keep = self._step_slots  # the held step's: no write since
        keys = torch.stack([self._held[i][0] for i in range(len(self._held))])  # [L, T, kv_heads, D]
        values = torch.stack([self._held[i][1] for i in range(len(self._held))])
        if keep is not None:
            keys, values = keys[:, keep], values[:, keep]
        head_size = keys.shape[-1]
        self.cache[..., :head_size].index_copy_(1, slots, keys)
        self.cache[..., head_size:].index_copy_(1, slots, values)
        self.drop_held()

    def drop_held(self) -> None:
        self._held.clear()


@dataclass
class TreeMode:
    """Process-wide switch and per-step tree layout, written by the model runner.

    `num_nodes[i]` is the number of tree nodes scheduled for request i this step (0: no tree), the
    nodes being the last `num_nodes[i]` query rows of the request, after its root.
    `ancestor_mask` is the `[N+1, N+1]` mask of this step's tree (scheduler-truncated trees are
    prefixes of it).
    """

    enabled: bool = False
    ancestor_mask: torch.Tensor | None = None
    num_nodes: torch.Tensor | None = None  # [num_reqs] int64
    slot_mapping: torch.Tensor | None = None  # [num_tokens] KV slot of each query row, this step
    layers: list[tuple[Any, Any, torch.Tensor]] = field(default_factory=list)  # (impl, layer, kv_cache)
    shadow: ShadowKV = field(default_factory=ShadowKV)
    reads_native: bool = False  # tree rows read vLLM's cache (`native_kv`), so no shadow is kept
    attention_calls: int = 0  # tree-row SDPA calls, for tests of batching
    disabled_parts: set[str] = field(default_factory=set)  # mutation checks in tests

    def reset(self, enabled: bool) -> None:
        """A new engine in this process: forget the previous engine's layers and step."""
        self.enabled = enabled
        self.ancestor_mask = self.num_nodes = self.slot_mapping = None
        self.layers.clear()
        self.shadow = ShadowKV()
        self.reads_native = False


TREE_MODE = TreeMode()


@dataclass
class TreeRows:
    """The tree-node rows of one step as one padded attention problem: G requests, Q nodes, K keys."""

    query_rows: torch.Tensor  # [G, Q] row of each node in the step's query, 0 where padded
    query_valid: torch.Tensor  # [G, Q] bool
    valid_index: torch.Tensor  # [M] flat indices (into G * Q) of the real nodes
    key_slots: torch.Tensor  # [G, K] KV slot of each key, 0 where padded (K: whole blocks)
    key_blocks: torch.Tensor  # [G, K / block_size] KV block of each block of keys, 0 where padded
    mask: torch.Tensor  # [G, 1, Q, K] bool, True = may attend


@dataclass
class TreeAttentionMetadata:
    native: CPUAttentionMetadata
    tree_rows: TreeRows | None


def build_tree_rows(
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
    num_nodes: torch.Tensor,
    ancestor_mask: torch.Tensor,
    causal_only: bool = False,
) -> TreeRows | None:
    """Queries, keys and mask of every tree-node row of a step, or None when no request has nodes.

    query_start_loc: [R+1], seq_lens: [R] (KV length after this step), block_table: [R, max_blocks],
    num_nodes: [R], ancestor_mask: [N+1, N+1]. Request i's k-th KV slot holds its k-th token; its last
    num_nodes[i] query rows are nodes 1..n, the row before them is the root (KV index `root`).
    Node t sees KV indices <= root (prefix and root) and the nodes u with ancestor_mask[t, u].
    """
    members = (num_nodes > 0).nonzero().flatten()
    if members.numel() == 0:
        return None
    n = num_nodes[members].long()
    seq = seq_lens[members].long()
    q_max, num_blocks = int(n.max()), -(-int(seq.max()) // block_size)
    t = torch.arange(1, q_max + 1)  # node index, [Q]
    k = torch.arange(num_blocks * block_size)  # KV index, [K]

    query_valid = t[None, :] <= n[:, None]
    first_node_row = query_start_loc[members + 1].long() - n
    query_rows = torch.where(query_valid, first_node_row[:, None] + t[None, :] - 1, 0)

    key_valid = k[None, :] < seq[:, None]
    block_valid = key_valid[:, ::block_size]
    key_blocks = torch.where(block_valid, block_table[members, :num_blocks].long(), 0)
    key_slots = torch.where(key_valid, key_blocks.repeat_interleave(block_size, 1) * block_size
                            + (k % block_size)[None, :], 0)

    root = seq - n - 1  # KV index of the root
    u = k[None, :] - root[:, None]  # [G, K]: 0 = root, 1..n = nodes
    if causal_only:
        tree_ok = u[:, None, :] <= t[None, :, None]
    else:
        n_max = ancestor_mask.shape[0] - 1
        tree_ok = ancestor_mask[t.clamp(max=n_max)[None, :, None], u.clamp(0, n_max)[:, None, :]]
    mask = key_valid[:, None, :] & ((u <= 0)[:, None, :] | (tree_ok & (u <= n[:, None])[:, None, :]))
    # A padded query row attends to key 0 only, so softmax never sees an empty row.
    mask |= (~query_valid)[:, :, None] & (k == 0)[None, None, :]
    return TreeRows(query_rows, query_valid, query_valid.flatten().nonzero().flatten(), key_slots, key_blocks,
                    mask[:, None])


def split_node_rows(
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_nodes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequences for vLLM's kernel in which every tree-node row is a sequence of its own reading 1 key.

    query_start_loc: [>= R+1], seq_lens: [>= R], num_nodes: [R] (request i's last num_nodes[i] rows are
    nodes). Returns query_start_loc [S+1], seq_lens [S] (same dtypes) and owner [S] (the request of
    each sequence, for its block-table row), S = R + sum(num_nodes): request i's own rows (its root,
    or a prefill chunk) keep their causal attention with seq_len cut to end at the root; each node
    row then reads the request's first key only, a cheap placeholder that the tree-row recompute
    overwrites.
    """
    num_reqs = len(num_nodes)
    n = num_nodes.long()
    owner = torch.repeat_interleave(torch.arange(num_reqs), 1 + n)
    first = torch.ones(len(owner), dtype=torch.bool)
    first[1:] = owner[1:] != owner[:-1]
    own_rows = (query_start_loc[1 : num_reqs + 1] - query_start_loc[:num_reqs]).long() - n
    rows = torch.where(first, own_rows[owner], 1)
    lens = torch.where(first, seq_lens[:num_reqs].long()[owner] - n[owner], 1)
    starts = torch.zeros(len(owner) + 1, dtype=torch.long)
    torch.cumsum(rows, 0, out=starts[1:])
    return starts.to(query_start_loc.dtype), lens.to(seq_lens.dtype), owner


class TreeAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # TREE_MODE is process-wide: a plain engine in the same process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
        # must stay vLLM's own whatever a tree engine there does.
        self.runs_trees = engine_runs_trees(self.vllm_config)
        if self.runs_trees:
            from vllm.config import CompilationMode

            shadow = TREE_MODE.shadow
            for name in self.layer_names:
                shadow.layer_index.setdefault(name, len(shadow.layer_index))
            shadow.may_hold = self.vllm_config.compilation_config.mode == CompilationMode.NONE
            TREE_MODE.reads_native = self.isa in NATIVE_LAYOUT_ISAS

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        native = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if not (self.runs_trees and TREE_MODE.enabled):
            return native
        m = common_attn_metadata
        if "held_shadow_writes" in TREE_MODE.disabled_parts:
            TREE_MODE.shadow.drop_held()
        TREE_MODE.shadow.flush()
        TREE_MODE.slot_mapping = m.slot_mapping
        tree_rows = None
        if TREE_MODE.num_nodes is not None and TREE_MODE.ancestor_mask is not None:
            num_reqs = m.num_reqs
            tree_rows = build_tree_rows(
                query_start_loc=m.query_start_loc_cpu[: num_reqs + 1],
                seq_lens=m.seq_lens[:num_reqs].cpu(),
                block_table=m.block_table_tensor[:num_reqs].cpu(),
                block_size=self.block_size,
                num_nodes=TREE_MODE.num_nodes[:num_reqs],
                ancestor_mask=TREE_MODE.ancestor_mask,
                causal_only="tree_mask" in TREE_MODE.disabled_parts,
            )
        TREE_MODE.shadow.hold = tree_rows is None and TREE_MODE.shadow.may_hold
        if tree_rows is not None and native.dynamic_causal is None:
            native = self._without_node_rows(native, TREE_MODE.num_nodes[:num_reqs])
        return TreeAttentionMetadata(native=native, tree_rows=tree_rows)

    def _without_node_rows(self, native: CPUAttentionMetadata, num_nodes: torch.Tensor) -> CPUAttentionMetadata:
        """vLLM's metadata with each tree-node row split off into a 1-row sequence that reads 1 key."""
        query_start_loc, seq_lens, owner = split_node_rows(
            native.query_start_loc, native.seq_lens, num_nodes
        )
        return dataclasses.replace(
            native,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_table=native.block_table[owner],
            max_query_len=int((query_start_loc[1:] - query_start_loc[:-1]).max()),
            scheduler_metadata=ops.cpu_attn_get_scheduler_metadata(
                num_reqs=len(seq_lens), num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim, seq_lens=seq_lens, dtype=self.dtype, query_start_loc=query_start_loc,
                causal=native.causal, sliding_window_size=self.window_size, isa=self.isa,
                enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, kv_cache_dtype=self.kv_cache_dtype,
            ),
        )


class TreeAttentionImpl(CPUAttentionBackendImpl):
    registered = False  # this layer is in TREE_MODE.layers (for move_kv)

    def __init__(self, *args, **kwargs):
        from vllm.config import get_current_vllm_config_or_none

        super().__init__(*args, **kwargs)
        self.runs_trees = engine_runs_trees(get_current_vllm_config_or_none())

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        if not isinstance(attn_metadata, TreeAttentionMetadata):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        super().forward(layer, query, key, value, kv_cache, attn_metadata.native, output, *args, **kwargs)
        rows = attn_metadata.tree_rows
        if rows is None:
            return output
        if TREE_MODE.reads_native:
            k_blocks, v_blocks = native_kv(kv_cache, self.head_size)
            num_reqs, num_blocks = rows.key_blocks.shape
            shape = (num_reqs, self.num_kv_heads, -1, self.head_size)  # [G, kv_heads, K, D]
            k = k_blocks[rows.key_blocks].permute(0, 2, 1, 4, 3).reshape(shape)
            v = v_blocks[rows.key_blocks].transpose(1, 2).reshape(shape)
        else:
            kv = TREE_MODE.shadow.layer(layer.layer_name)[rows.key_slots]  # [G, K, kv_heads, 2D]
            k = kv[..., : self.head_size].transpose(1, 2)
            v = kv[..., self.head_size :].transpose(1, 2)
        q = query[rows.query_rows].transpose(1, 2)  # [G, H, Q, D]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=rows.mask, scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads
        )
        TREE_MODE.attention_calls += 1
        flat = output.view(-1, self.num_heads, self.head_size)
        nodes = out.transpose(1, 2).reshape(-1, self.num_heads, self.head_size)[rows.valid_index]
        flat[rows.query_rows.flatten()[rows.valid_index]] = nodes.to(output.dtype)
        return output

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if not (self.runs_trees and TREE_MODE.enabled):
            return
        if not self.registered:
            TREE_MODE.layers.append((self, layer, kv_cache))
            self.registered = True
        if TREE_MODE.reads_native:
            return
        n = slot_mapping.shape[0]
        if key.shape[0] != n:  # padded rows; a slice costs microseconds per layer, so only when needed
            key, value = key[:n], value[:n]
        TREE_MODE.shadow.write(layer.layer_name, key, value, slot_mapping, kv_cache)

    @staticmethod
    def move_kv(layers: list[tuple[Any, Any, torch.Tensor]], src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """Native cache (and shadow, if kept) of every layer. Sources are read before anything is written, so
        overlapping moves (dst <= src) are safe; the native cache is written through vLLM's own writer, so
        its ISA-specific layout is respected."""
        shadow = TREE_MODE.shadow
        if not TREE_MODE.reads_native:
            shadow.flush()
            moved_all = shadow.cache[:, src_slots]  # [L, M, kv_heads, 2D]
            shadow.cache[:, dst_slots] = moved_all
        for impl, layer, kv_cache in layers:
            num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
            if TREE_MODE.reads_native:
                k_blocks, v_blocks = native_kv(kv_cache, impl.head_size)
                block, offset = src_slots // block_size, src_slots % block_size
                keys = k_blocks[block, :, :, offset].contiguous()  # [M, kv_heads, D]
                values = v_blocks[block, :, offset].contiguous()
            else:
                moved = moved_all[shadow.layer_index[layer.layer_name]]
                keys, values = moved[..., : impl.head_size].contiguous(), moved[..., impl.head_size :].contiguous()
            key_cache, value_cache = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1).chunk(2, dim=2)
            ops.cpu_attn_reshape_and_cache(
                keys, values, key_cache, value_cache, dst_slots, layer.isa,
                k_scale=layer._k_scale_float, v_scale=layer._v_scale_float, kv_cache_dtype=impl.kv_cache_dtype,
            )


def move_kv(src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
    """Copy the KV of `src_slots` into `dst_slots` in every layer, with the backend's own mover (CPU: shadow
    and native cache here; GPU: `gpu_attention.TreeFlashAttentionImpl.move_kv`)."""
    if src_slots.numel() == 0 or not TREE_MODE.layers:
        return
    TREE_MODE.layers[0][0].move_kv(TREE_MODE.layers, src_slots, dst_slots)


class TreeAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU backend, with tree-node rows recomputed once the runner switches tree mode on."""

    @staticmethod
    def get_impl_cls():
        return TreeAttentionImpl

    @staticmethod
    def get_builder_cls():
        return TreeAttentionMetadataBuilder
