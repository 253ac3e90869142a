"""Tree-masked attention over vLLM's paged KV cache: a Triton kernel and its PyTorch reference.

The queries are the tree rows of every request of a step (root + up to N nodes each, ragged through
`query_start_loc`); their K/V are already in the cache, as vLLM writes a step's KV before attention runs.
Mask semantics are those of the CPU backend (`vllm_medusa.vllm.attention.build_groups`): key k of request i
is its k-th KV slot, query row j sits at KV index ctx_i + j (ctx_i = seq_len_i - q_len_i) and attends
causally, except that tree node t (row root + t, root = q_len - num_nodes - 1) sees of the tree keys
only its ancestors and itself (`TreeSpec.ancestor_mask`, passed packed as bits).

Cache layout: `key_cache` and `value_cache` are `[num_blocks, block_size, num_kv_heads, head_size]` with any
strides but a unit last one. That covers FlashAttention's `[2, num_blocks, block_size, H_kv, D]` (`kv[0]`,
`kv[1]`) and vLLM 0.32's per-layer `[num_blocks, H_kv, block_size, 2 * D]` tensor, whatever its physical
order (`split_kv_cache`, the same view vLLM's FlashAttention and Triton backends take).

The kernel is split-K ("flash decoding"): each program takes one request, one KV head, a tile of query rows
(all query heads of the KV head's group, so GQA reads each KV tile once) and one slice of the context; a
second kernel merges the slices by log-sum-exp. The grid depends only on the batch size, the static
`max_query_len` and `num_splits`, and no step reads a tensor back to the host, so a step with a fixed tree
can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

_WORD_BITS = 32
_MAX_SPLITS = 64
# A split must cover at least this many keys, and at least this many keys per query row of a program, so
# its fp32 partial output (written and read back once) stays small next to the K/V bytes it reads: at 8 keys
# per row it is at most a quarter of them.
_MIN_SPLIT_KEYS = 256
_SPLIT_KEYS_PER_ROW = 8  # measured on an H100: batch 1, 4k context, 65 rows: 8 splits 47 us, 4 splits 54 us
# Where one split's programs already exceed a wave of slots, up to this many splits even out the last one.
_MIN_SPLIT_CAP = 3


# --- tree mask ------------------------------------------------------------------------------------------


def pack_tree_mask(ancestor_mask: Tensor) -> Tensor:
    """Pack a `[N+1, N+1]` bool ancestor mask into int32 words `[N+1, ceil((N+1) / 32)]`.

    Bit u % 32 of word u // 32 in row t is `ancestor_mask[t, u]` (tree position u is t or an ancestor of t).
    """
    if ancestor_mask.dim() != 2 or ancestor_mask.shape[0] != ancestor_mask.shape[1]:
        raise ValueError(f"ancestor_mask must be square [N+1, N+1], got {list(ancestor_mask.shape)}")
    positions = ancestor_mask.shape[0]
    words = math.ceil(positions / _WORD_BITS)
    padded = torch.zeros(positions, words * _WORD_BITS, dtype=torch.int64, device=ancestor_mask.device)
    padded[:, :positions] = ancestor_mask.to(torch.int64)
    weights = torch.ones(_WORD_BITS, dtype=torch.int64, device=ancestor_mask.device) << torch.arange(
        _WORD_BITS, device=ancestor_mask.device
    )
    packed = (padded.view(positions, words, _WORD_BITS) * weights).sum(-1)  # [N+1, W], 0 .. 2**32 - 1
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # same bits as int32


def unpack_tree_mask(tree_bits: Tensor, num_positions: int) -> Tensor:
    """Inverse of `pack_tree_mask`: `[N+1, W]` int32 words -> `[N+1, N+1]` bool."""
    shifts = torch.arange(_WORD_BITS, device=tree_bits.device)
    bits = (tree_bits.to(torch.int64)[:, :, None] >> shifts) & 1  # [N+1, W, 32]
    return bits.flatten(1)[:, :num_positions].bool()


def tree_attention_mask(q_len: int, seq_len: int, num_nodes: int, ancestor_mask: Tensor) -> Tensor:
    """`[q_len, seq_len]` bool mask of one request, True where query row j may attend to key k.

    Causal (row j at KV index ctx + j), and node t sees only its ancestors among the tree keys.
    """
    ctx = seq_len - q_len
    root = q_len - num_nodes - 1
    if ctx < 0 or root < 0 or num_nodes >= ancestor_mask.shape[0]:
        raise ValueError(f"inconsistent lengths: q_len={q_len}, seq_len={seq_len}, num_nodes={num_nodes}")
    j = torch.arange(q_len, device=ancestor_mask.device)[:, None]
    k = torch.arange(seq_len, device=ancestor_mask.device)[None, :]
    t, u = j - root, k - (ctx + root)  # tree positions of row and key (1..n inside the tree)
    in_tree = (t >= 1) & (u >= 1) & (u <= num_nodes)
    ancestor = ancestor_mask[t.clamp(0, num_nodes), u.clamp(0, num_nodes)]
    return (k <= ctx + j) & (~in_tree | ancestor)


# --- cache layout ---------------------------------------------------------------------------------------


def split_kv_cache(kv_cache: Tensor, head_size: int) -> tuple[Tensor, Tensor]:
    """K and V views `[num_blocks, block_size, H_kv, D]` of a vLLM 0.32 per-layer cache.

    kv_cache: logical `[num_blocks, H_kv, block_size, 2 * D]` (K in `[..., :D]`, V in `[..., D:]`), any
    physical order; vLLM's GPU default (`KVCacheLayout.LBNHC`) stores it as `[num_blocks, block_size, H_kv,
    2 * D]`. No copy: the kernel reads through the views' strides.
    """
    if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * head_size:
        raise ValueError(
            f"expected a [num_blocks, H_kv, block_size, {2 * head_size}] cache, got {list(kv_cache.shape)}"
        )
    key, value = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return key, value


# --- launch plan ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TilePlan:
    """How a KV head's query rows (query rows x heads of its group) are cut into programs, and their shape.

    Rows [root_row + m * block_m, root_row + (m+1) * block_m) of program m go through the tensor cores.
    With `root_row`, row 0 (the root of a tree, a plain decode row) goes through a separate 16-row block
    of the single program, so a 64-node tree and its root (65 rows) cost 64 + 16 rows instead of 128.
    block_n keys per step; num_warps, num_stages: Triton launch options.
    """

    block_m: int
    m_tiles: int
    root_row: bool = False
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        if self.root_row and self.m_tiles != 1:
            raise ValueError("a separate root row needs a single row tile")

    @property
    def rows_covered(self) -> int:
        return self.root_row + self.m_tiles * self.block_m

    @property
    def rows_per_program(self) -> int:
        return self.root_row + self.block_m

    @property
    def programs_per_sm(self) -> int:
        """Programs resident per SM (H100, Triton 3.6): a 4-warp tile uses <= 255 registers per thread and
        <= 112 KiB of shared memory, so two fit; the 8-warp 128-row tile (242-255 registers) nearly fills the
        register file alone."""
        return 1 if self.num_warps >= 8 else 2


def tile_plan(rows: int) -> TilePlan:
    """The plan computing the fewest rows; an extra program counts as 32 rows (it re-reads the KV), and a
    128-row tile as 192 rows: it runs alone on its SM with two pipeline stages, where two 64-row programs of
    three stages share one. (H100, GQA 4 heads per KV head, batch 1/8, context 4k/16k, best split count
    each: 2x64 beat 1x128 by 22-32% at 68 rows, 5x64 beat 3x128 by 8-31% at 260, 9x64 beat 5x128 by
    10-23% at 516.) So the 128-row tile remains only for 129 rows (MHA, 128 nodes + the root block)."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    candidates = []
    for block_m in (16, 32, 64, 128):
        for root_row in (False, True):
            m_tiles = max(1, math.ceil((rows - root_row) / block_m))
            if root_row and (m_tiles > 1 or rows == 1):
                continue
            cost = m_tiles * (block_m + block_m // 2 * (block_m == 128)) + 32 * m_tiles + 16 * root_row
            candidates.append((cost, m_tiles, root_row, block_m))
    _, m_tiles, root_row, block_m = min(candidates)
    # 128-row tiles need two warpgroups and leave shared memory for two pipeline stages only.
    return TilePlan(block_m, m_tiles, root_row, num_warps=8 if block_m == 128 else 4,
                    num_stages=2 if block_m == 128 else 3)


def choose_num_splits(programs_per_split: int, rows_per_program: int, max_seq_len: int, num_sms: int,
                      programs_per_sm: int = 2) -> int:
    """Context slices per request, S: the count whose programs (S * programs_per_split, all equally long)
    fill their last wave of `programs_per_sm * num_sms` slots best, the fewest on ties. S goes up to one
    wave (more splits only add partial outputs to merge; below a wave, the best fill is the most splits
    that fit it) or, where one split's programs exceed a wave already, up to `_MIN_SPLIT_CAP`; no slice is
    shorter than `_MIN_SPLIT_KEYS` keys or `_SPLIT_KEYS_PER_ROW` keys per query row of a program (its
    partial output must stay small).

    Why waves: with 4 query heads per KV head the tree rows make a step compute-bound, so the time follows
    the number of waves (H100, batch 1, 4k context, 5x64 tiles, 40 programs per split: 5 splits 42.5 us,
    6 splits 44.3 us, 8 splits 51.4 us, 2 splits 54.1 us; batch 8: 320 programs, 1 split 275 us, 3 splits
    218 us). Host ints only, so the launch shape is fixed for a CUDA graph.
    """
    slots = programs_per_sm * num_sms
    affordable = max_seq_len // max(_MIN_SPLIT_KEYS, _SPLIT_KEYS_PER_ROW * rows_per_program)
    limit = max(1, min(affordable, max(_MIN_SPLIT_CAP, slots // programs_per_split), _MAX_SPLITS))

    def fill(splits: int) -> float:
        programs = splits * programs_per_split
        return programs / (-(-programs // slots) * slots)

    return max(range(1, limit + 1), key=lambda splits: (fill(splits), -splits))


@dataclass(frozen=True)
class TreeAttentionMetadata:
    """One step's tree attention metadata, shared by all layers (tensors on the query's device).

    block_table:     [R, max_blocks] int32, the requests' KV blocks.
    seq_lens:        [R] int32, KV length of each request after this step (context + its query rows).
    query_start_loc: [R+1] int32, first query row of each request; q_len_i <= max_query_len.
    num_nodes:       [R] int32, tree nodes among request i's last query rows (0: plain decode row).
    tree_bits:       [N+1, W] int32, `pack_tree_mask(tree.ancestor_mask)`.
    max_query_len, num_heads, num_kv_heads, plan, num_splits: static launch shape.
    """

    block_table: Tensor
    seq_lens: Tensor
    query_start_loc: Tensor
    num_nodes: Tensor
    tree_bits: Tensor
    max_query_len: int
    num_heads: int
    num_kv_heads: int
    plan: TilePlan
    num_splits: int


def build_tree_attention_metadata(
    block_table: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    num_nodes: Tensor,
    ancestor_mask: Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    max_query_len: int,
    max_seq_len: int,
    num_sms: int | None = None,
    num_splits: int | None = None,
) -> TreeAttentionMetadata:
    """Pack the tree mask and choose the launch shape (host ints only: nothing is read from the device).

    max_seq_len: an upper bound of `seq_lens` (for CUDA graphs, the bound the graph is captured for).
    num_sms: the GPU's multiprocessor count (default: that of `block_table`'s device, else 132).
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    rows = max_query_len * (num_heads // num_kv_heads)
    plan = tile_plan(rows)
    if num_splits is None:
        if num_sms is None:
            num_sms = _num_sms(block_table.device)
        num_splits = choose_num_splits(len(seq_lens) * num_kv_heads * plan.m_tiles,
                                       min(rows, plan.rows_per_program), max_seq_len, num_sms,
                                       plan.programs_per_sm)
    device = block_table.device
    return TreeAttentionMetadata(
        block_table=block_table.to(torch.int32),
        seq_lens=seq_lens.to(device, torch.int32),
        query_start_loc=query_start_loc.to(device, torch.int32),
        num_nodes=num_nodes.to(device, torch.int32),
        tree_bits=pack_tree_mask(ancestor_mask.to(device)),
        max_query_len=max_query_len,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        plan=plan,
        num_splits=num_splits,
    )


@dataclass(frozen=True)
class TreeRequestRows:
    """The requests of a step that carry tree nodes, as the kernel's compact batch.

    requests:        [G] int64, their indices among the step's requests.
    rows:            [T'] int64, their query rows in the step's query, request by request.
    query_start_loc: [G+1] int32, where each request's rows start within `rows`.
    """

    requests: Tensor
    rows: Tensor
    query_start_loc: Tensor


def select_tree_requests(query_start_loc: Tensor, num_nodes: Tensor) -> TreeRequestRows | None:
    """query_start_loc [R+1], num_nodes [R] (host tensors) -> the requests with tree nodes and their rows;
    None when no request has any. Other rows (prefill, plain decode) stay with vLLM's own kernel."""
    requests = (num_nodes > 0).nonzero().flatten()
    if requests.numel() == 0:
        return None
    starts = query_start_loc[requests].long()
    lengths = query_start_loc[requests + 1].long() - starts
    offsets = torch.zeros(len(requests) + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    rows = torch.arange(int(offsets[-1])) + (starts - offsets[:-1]).repeat_interleave(lengths)
    return TreeRequestRows(requests, rows, offsets.to(torch.int32))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100's count: a plan built on the host for a GPU


# --- attention ------------------------------------------------------------------------------------------


def tree_attention(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    meta: TreeAttentionMetadata,
    scale: float,
    out: Tensor | None = None,
) -> Tensor:
    """Tree-masked paged attention (Triton); returns `out`.

    query: [T, H, D] (T = query_start_loc[-1] rows), key_cache / value_cache: [num_blocks, block_size,
    H_kv, D] (unit last stride), out: [T, H, D] or None. fp16 or bf16, D a power of two in 16..256.
    """
    _check_inputs(query, key_cache, value_cache, meta)
    from vllm_medusa.kernels import _triton_kernels  # Triton only when a GPU kernel runs

    if out is None:
        out = torch.empty_like(query)
    _triton_kernels.tree_attention(query, key_cache, value_cache, meta, scale, out)
    return out


def tree_attention_reference(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    meta: TreeAttentionMetadata,
    scale: float,
    out: Tensor | None = None,
) -> Tensor:
    """PyTorch reference of `tree_attention`: gathers each request's context, builds its mask, runs SDPA
    in float32 (one call per request: slow, for tests)."""
    _check_inputs(query, key_cache, value_cache, meta)
    if out is None:
        out = torch.empty_like(query)
    ancestor_mask = unpack_tree_mask(meta.tree_bits, meta.tree_bits.shape[0])
    block_size = key_cache.shape[1]
    starts = meta.query_start_loc.tolist()
    for i, (seq_len, num_nodes) in enumerate(zip(meta.seq_lens.tolist(), meta.num_nodes.tolist())):
        q_len = starts[i + 1] - starts[i]
        if q_len == 0:
            continue
        keys = torch.arange(seq_len, device=query.device)
        blocks = meta.block_table[i, keys // block_size].long()
        k = key_cache[blocks, keys % block_size].float().transpose(0, 1)  # [H_kv, S, D]
        v = value_cache[blocks, keys % block_size].float().transpose(0, 1)
        q = query[starts[i] : starts[i + 1]].float().transpose(0, 1)  # [H, q_len, D]
        mask = tree_attention_mask(q_len, seq_len, num_nodes, ancestor_mask)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[starts[i] : starts[i + 1]] = o.transpose(0, 1).to(out.dtype)
    return out


def _check_inputs(query: Tensor, key_cache: Tensor, value_cache: Tensor, meta: TreeAttentionMetadata) -> None:
    if query.dim() != 3 or key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(
            f"expected query [T, H, D] and K/V caches [num_blocks, block_size, H_kv, D], got "
            f"{list(query.shape)}, {list(key_cache.shape)}, {list(value_cache.shape)}"
        )
    head_size = query.shape[2]
    if (query.shape[1], key_cache.shape[2]) != (meta.num_heads, meta.num_kv_heads) or key_cache.shape[3] != head_size:
        raise ValueError(
            f"query {list(query.shape)} / cache {list(key_cache.shape)} do not match the metadata's "
            f"{meta.num_heads} heads and {meta.num_kv_heads} KV heads"
        )
    if head_size & (head_size - 1) or not 16 <= head_size <= 256:
        raise ValueError(f"head size must be a power of two in 16..256, got {head_size}")
    if query.dtype != key_cache.dtype or key_cache.dtype != value_cache.dtype:
        raise ValueError(
            f"query and caches must share a dtype, got {query.dtype}, {key_cache.dtype}, {value_cache.dtype}"
        )
    if min(query.stride(-1), key_cache.stride(-1), value_cache.stride(-1)) != 1:
        raise ValueError("query and K/V caches need a unit stride in the head dimension")
