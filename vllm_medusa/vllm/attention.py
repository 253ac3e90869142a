"""Tree attention on vLLM's paged KV cache, CPU.

vLLM's CPU kernel masks causally only and packs K/V per ISA, so once tree Medusa is on this backend
takes over the whole attention of the model (prefill, chunked prefill, roots and tree nodes):

* the cache keeps vLLM's shape `[num_blocks, kv_heads, block_size, 2 * head_size]`, but token-major
  inside a head (`[..., :head_size]` is K, `[..., head_size:]` is V), so any slot can be read or
  moved with one indexing op, whatever the dtype or ISA;
* each step, the metadata builder turns the batch into at most two padded groups (short query rows:
  decode and tree verification; long ones: prefill chunks) with one boolean mask each, built once
  and shared by all layers;
* each layer then runs one `scaled_dot_product_attention` call per group: the number of attention
  calls per layer does not grow with the number of requests.

When the runner has not switched tree mode on (`TREE_MODE.enabled` is False) every method falls
through to vLLM's own CPU backend, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)


@dataclass
class TreeMode:
    """Process-wide switch and per-step tree layout, written by the model runner.

    `num_nodes[i]` is the number of tree nodes scheduled for request i this step (0: no tree), the
    nodes being the last `num_nodes[i]` query rows of the request, after its root.
    `ancestor_mask` is the full tree's `[N+1, N+1]` mask; a truncated tree is a prefix of it.
    """

    enabled: bool = False
    ancestor_mask: torch.Tensor | None = None
    num_nodes: torch.Tensor | None = None  # [num_reqs] int64
    slot_mapping: torch.Tensor | None = None  # [num_tokens] KV slot of each query row, this step
    attention_calls: int = 0  # counts SDPA calls, for tests of batching
    disabled_parts: set[str] = field(default_factory=set)  # mutation checks in tests


TREE_MODE = TreeMode()

# Rows of at most this many query tokens go into the "short" group; others into the "long" one.
_SHORT_QUERY = 129


@dataclass
class TreeAttentionGroup:
    """One padded attention call: G requests, Q query rows, K keys each."""

    query_rows: torch.Tensor  # [G, Q] row into the step's query, 0 where padded
    query_valid: torch.Tensor  # [G, Q] bool
    key_blocks: torch.Tensor  # [G, K] block id of each key
    key_offsets: torch.Tensor  # [G, K] offset of each key in its block
    mask: torch.Tensor  # [G, 1, Q, K] bool, True = may attend


@dataclass
class TreeAttentionMetadata:
    num_actual_tokens: int
    slot_mapping: torch.Tensor  # [num_tokens]
    groups: list[TreeAttentionGroup]


def build_groups(
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
    num_nodes: torch.Tensor | None,
    ancestor_mask: torch.Tensor | None,
) -> list[TreeAttentionGroup]:
    """Split a step's requests into padded attention groups with their masks.

    query_start_loc: [R+1], seq_lens: [R] (KV length after this step), block_table: [R, max_blocks],
    num_nodes: [R] tree nodes per request (or None), ancestor_mask: [N+1, N+1].
    Key k of request i is its k-th KV slot; query row j sits at KV index ctx_i + j.
    """
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    short = q_lens <= _SHORT_QUERY
    groups = []
    for members in (short.nonzero().flatten(), (~short).nonzero().flatten()):
        if members.numel():
            groups.append(
                _build_group(
                    members, query_start_loc, q_lens, seq_lens, block_table, block_size,
                    num_nodes, ancestor_mask,
                )
            )
    return groups


def _build_group(
    members: torch.Tensor,
    query_start_loc: torch.Tensor,
    q_lens_all: torch.Tensor,
    seq_lens_all: torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
    num_nodes_all: torch.Tensor | None,
    ancestor_mask: torch.Tensor | None,
) -> TreeAttentionGroup:
    q_lens = q_lens_all[members].long()
    seq_lens = seq_lens_all[members].long()
    ctx = seq_lens - q_lens
    q_max, k_max = int(q_lens.max()), int(seq_lens.max())
    j = torch.arange(q_max)
    k = torch.arange(k_max)

    query_valid = j[None, :] < q_lens[:, None]
    query_rows = torch.where(query_valid, query_start_loc[members].long()[:, None] + j, 0)
    key_valid = k[None, :] < seq_lens[:, None]
    key_blocks = block_table[members].long().gather(1, (k // block_size)[None, :].expand(len(members), -1))
    key_offsets = (k % block_size)[None, :].expand(len(members), -1)

    q_index = ctx[:, None] + j[None, :]  # KV index of each query row
    mask = (k[None, None, :] <= q_index[:, :, None]) & key_valid[:, None, :]
    if num_nodes_all is not None and ancestor_mask is not None:
        mask &= _tree_visibility(num_nodes_all[members].long(), q_lens, ctx, j, k, ancestor_mask)
    # A padded query row attends to key 0 only, so softmax never sees an empty row.
    mask |= (~query_valid)[:, :, None] & (k == 0)[None, None, :]
    return TreeAttentionGroup(
        query_rows=query_rows,
        query_valid=query_valid,
        key_blocks=torch.where(key_valid, key_blocks, 0),
        key_offsets=key_offsets,
        mask=mask[:, None],
    )


def _tree_visibility(
    num_nodes: torch.Tensor,
    q_lens: torch.Tensor,
    ctx: torch.Tensor,
    j: torch.Tensor,
    k: torch.Tensor,
    ancestor_mask: torch.Tensor,
) -> torch.Tensor:
    """[G, Q, K] False where a tree node would see a tree node that is not its ancestor.

    Node t (1..n) of request g is query row root + t; tree key u (1..n) is KV index ctx + root + u.
    """
    if "tree_mask" in TREE_MODE.disabled_parts:
        return torch.ones(len(num_nodes), len(j), len(k), dtype=torch.bool)
    root = q_lens - num_nodes - 1
    t = j[None, :] - root[:, None]  # [G, Q]
    u = k[None, :] - (ctx + root)[:, None]  # [G, K]
    n_max = ancestor_mask.shape[0] - 1
    t_in = (t >= 1) & (t <= num_nodes[:, None])
    u_in = (u >= 1) & (u <= num_nodes[:, None])
    allowed = ancestor_mask[t.clamp(0, n_max)[:, :, None], u.clamp(0, n_max)[:, None, :]]
    return ~(t_in[:, :, None] & u_in[:, None, :]) | allowed


class TreeAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        if not TREE_MODE.enabled:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        m = common_attn_metadata
        num_reqs = m.num_reqs
        TREE_MODE.slot_mapping = m.slot_mapping
        groups = build_groups(
            query_start_loc=m.query_start_loc_cpu[: num_reqs + 1],
            seq_lens=m.seq_lens[:num_reqs].cpu(),
            block_table=m.block_table_tensor[:num_reqs].cpu(),
            block_size=self.block_size,
            num_nodes=TREE_MODE.num_nodes,
            ancestor_mask=TREE_MODE.ancestor_mask,
        )
        return TreeAttentionMetadata(
            num_actual_tokens=m.num_actual_tokens,
            slot_mapping=m.slot_mapping,
            groups=groups,
        )


class TreeAttentionImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        if not isinstance(attn_metadata, TreeAttentionMetadata):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        head_size = self.head_size
        for group in attn_metadata.groups:
            # kv_cache[block, head, offset] -> [G, K, kv_heads, 2 * head_size]
            kv = kv_cache[group.key_blocks, :, group.key_offsets]
            k = kv[..., :head_size].transpose(1, 2)
            v = kv[..., head_size:].transpose(1, 2)
            q = query[group.query_rows].transpose(1, 2)  # [G, H, Q, D]
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=group.mask, scale=self.scale,
                enable_gqa=self.num_heads != self.num_kv_heads,
            )
            TREE_MODE.attention_calls += 1
            rows = group.query_rows[group.query_valid]
            output.view(-1, self.num_heads, head_size)[rows] = out.transpose(1, 2)[group.query_valid].to(output.dtype)
        return output

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        if not TREE_MODE.enabled:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        n = slot_mapping.shape[0]
        slots = slot_mapping.long()
        block_size = kv_cache.shape[2]
        blocks, offsets = slots // block_size, slots % block_size
        kv_cache[blocks, :, offsets] = torch.cat([key[:n], value[:n]], dim=-1).to(kv_cache.dtype)


def move_kv(kv_caches: list[torch.Tensor], src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
    """Copy the KV of `src_slots` into `dst_slots` in every layer (token-major tree layout).

    Reads all sources before writing, so overlapping moves (dst <= src) are safe.
    """
    if src_slots.numel() == 0:
        return
    for cache in kv_caches:
        block_size = cache.shape[2]
        cache[dst_slots // block_size, :, dst_slots % block_size] = cache[
            src_slots // block_size, :, src_slots % block_size
        ]


class TreeAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU backend, with tree attention once the runner switches tree mode on."""

    @staticmethod
    def get_impl_cls():
        return TreeAttentionImpl

    @staticmethod
    def get_builder_cls():
        return TreeAttentionMetadataBuilder
