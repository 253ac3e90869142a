"""Triton kernels behind `tree_attention` and `compact_kv` (imported only when a kernel runs).

Tree attention, stage 1: program (m, s, i * H_kv + h) attends query rows [ROOT_ROW + m * BLOCK_M,
ROOT_ROW + (m+1) * BLOCK_M) of KV head h of request i over context slice s, and with ROOT_ROW row 0 in a
separate 16-row block (see `TilePlan`). A row r is query row r // GROUP of the request at query head
h * GROUP + r % GROUP, so a KV tile is loaded once for the whole GQA group. Key tiles wholly before the
first query row's position need no mask; only the last tiles of a request (its own query rows' keys)
evaluate the causal and tree masks.
Stage 2 merges the slices' normalised partial outputs by their log-sum-exp (base 2).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from vllm_medusa.kernels.tree_attention import TreeAttentionMetadata

_LOG2E = 1.4426950408889634


@triton.jit
def _load_q(Q, q0, q_len, kv_head, rows, stride_qt, stride_qh, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr):
    """[len(rows), HEAD_DIM] query tile; rows past the request's query rows read as zeros."""
    j = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    d = tl.arange(0, HEAD_DIM)
    ptrs = Q + (q0 + j).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    return tl.load(ptrs, mask=(j < q_len)[:, None], other=0.0)


@triton.jit
def _block_ids(block_row, keys, valid, PAGE: tl.constexpr):
    """[len(keys)] int64: the cache block of each key (block_row: the request's row of the block table)."""
    return tl.load(block_row + keys // PAGE, mask=valid, other=0).to(tl.int64)


@triton.jit
def _load_kv(Cache, blocks, keys, valid, kv_head, stride_b, stride_s, stride_h,
             PAGE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """[len(keys), HEAD_DIM] tile of K or V; blocks: `_block_ids(keys)`."""
    offsets = blocks * stride_b + (keys % PAGE) * stride_s + kv_head * stride_h
    d = tl.arange(0, HEAD_DIM)
    return tl.load(Cache + offsets[:, None] + d[None, :], mask=valid[:, None], other=0.0)


@triton.jit
def _visible(rows, keys, k_end, ctx, root, num_nodes, TreeBits, tree_words, GROUP: tl.constexpr):
    """[len(rows), len(keys)] bool: causal, and among tree keys only the row's ancestors (and itself)."""
    j = rows // GROUP
    causal = (keys[None, :] <= (ctx + j)[:, None]) & (keys < k_end)[None, :]
    t = j - root  # tree position of the row (1..num_nodes for nodes)
    u = keys - (ctx + root)  # tree position of the key
    in_tree = causal & ((t >= 1) & (t <= num_nodes))[:, None] & (u >= 1)[None, :]
    u_safe = tl.maximum(u, 0)
    words = tl.load(TreeBits + t[:, None] * tree_words + (u_safe // 32)[None, :], mask=in_tree, other=0)
    ancestor = ((words >> (u_safe % 32)[None, :]) & 1) != 0
    return causal & (ancestor | ~in_tree)


@triton.jit
def _attend(q, k, v, m_i, l_i, acc, qk_scale, visible, MASKED: tl.constexpr, KEYWISE_SUM: tl.constexpr = False):
    """One online-softmax step over a key tile. m_i starts at -1e30, not -inf, so an all-masked tile
    leaves the state unchanged instead of producing NaN. With KEYWISE_SUM, l_i is [rows, BLOCK_N] (summed
    over keys once at the end): for a block whose keys are spread over the warps, one cross-warp reduction
    (a barrier) per tile fewer."""
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    if KEYWISE_SUM:
        l_i = l_i * alpha[:, None] + p
    else:
        l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _store(Out, PartO, PartLse, rows, valid, m_i, l_i, acc, q0, kv_head, split,
           stride_ot, stride_oh, stride_ps, stride_pt, stride_ph, stride_ls, stride_lt,
           GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr):
    token = (q0 + rows // GROUP).to(tl.int64)
    head = kv_head * GROUP + rows % GROUP
    d = tl.arange(0, HEAD_DIM)
    l_safe = tl.where(l_i > 0, l_i, 1.0)  # a row may see no key of a slice
    o = acc / l_safe[:, None]
    if not SPLIT:
        ptrs = Out + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(ptrs, o.to(Out.dtype.element_ty), mask=valid[:, None])
    else:
        ptrs = PartO + split * stride_ps + token[:, None] * stride_pt + head[:, None] * stride_ph + d[None, :]
        tl.store(ptrs, o, mask=valid[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(PartLse + split * stride_ls + token * stride_lt + head, lse, mask=valid)


# Runtime ints that vary between calls of one model are not specialised (no recompilation per value).
@triton.jit(do_not_specialize=["num_splits", "num_kv_heads", "tree_words", "stride_bt", "stride_ls", "stride_lt"])
def _tree_attention_kernel(
    Q, K, V, BlockTable, SeqLens, QueryStart, NumNodes, TreeBits, Out, PartO, PartLse,
    qk_scale, num_splits, num_kv_heads, tree_words,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    stride_ot, stride_oh, stride_ps, stride_pt, stride_ph, stride_ls, stride_lt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr,
    ROOT_ROW: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    req = tl.program_id(2) // num_kv_heads
    kv_head = tl.program_id(2) % num_kv_heads

    seq_len = tl.load(SeqLens + req)
    q0 = tl.load(QueryStart + req)
    q_len = tl.load(QueryStart + req + 1) - q0
    ctx = seq_len - q_len
    num_nodes = tl.load(NumNodes + req)
    root = q_len - num_nodes - 1
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    k_start = split * chunk
    if k_start >= seq_len:  # the stage-2 merge skips this slice too
        return
    k_end = tl.minimum(k_start + chunk, seq_len)
    # Keys 0..ctx are visible to every row: whole tiles of them go without a mask.
    clean_end = tl.maximum(tl.minimum(k_end, (ctx + 1) // BLOCK_N * BLOCK_N), k_start)
    block_row = BlockTable + req.to(tl.int64) * stride_bt

    rows = ROOT_ROW + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_q(Q, q0, q_len, kv_head, rows, stride_qt, stride_qh, GROUP, HEAD_DIM)
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if ROOT_ROW:  # a 16-row block (the smallest MMA) of which only row 0 is stored
        root_rows = tl.arange(0, 16)
        q_r = _load_q(Q, q0, q_len, kv_head, root_rows, stride_qt, stride_qh, GROUP, HEAD_DIM)
        m_r = tl.full([16], -1e30, tl.float32)
        l_r = tl.zeros([16, BLOCK_N], tl.float32)
        acc_r = tl.zeros([16, HEAD_DIM], tl.float32)

    # A tile's block ids are loaded one iteration ahead: K/V loads that wait on a load of the same iteration
    # get one pipeline buffer fewer (none left with the root block), exposing the memory latency per tile.
    first = k_start + tl.arange(0, BLOCK_N)
    blocks = _block_ids(block_row, first, first < k_end, PAGE)
    for k0 in range(k_start, clean_end, BLOCK_N):
        keys = k0 + tl.arange(0, BLOCK_N)
        all_keys = keys >= 0
        k = _load_kv(K, blocks, keys, all_keys, kv_head, stride_kb, stride_ks, stride_kh, PAGE, HEAD_DIM)
        v = _load_kv(V, blocks, keys, all_keys, kv_head, stride_vb, stride_vs, stride_vh, PAGE, HEAD_DIM)
        blocks = _block_ids(block_row, keys + BLOCK_N, keys + BLOCK_N < k_end, PAGE)
        m_i, l_i, acc = _attend(q, k, v, m_i, l_i, acc, qk_scale, 0, False)
        if ROOT_ROW:
            m_r, l_r, acc_r = _attend(q_r, k, v, m_r, l_r, acc_r, qk_scale, 0, False, True)

    for k0 in range(clean_end, k_end, BLOCK_N):
        keys = k0 + tl.arange(0, BLOCK_N)
        valid = keys < k_end
        blocks = _block_ids(block_row, keys, valid, PAGE)
        k = _load_kv(K, blocks, keys, valid, kv_head, stride_kb, stride_ks, stride_kh, PAGE, HEAD_DIM)
        v = _load_kv(V, blocks, keys, valid, kv_head, stride_vb, stride_vs, stride_vh, PAGE, HEAD_DIM)
        visible = _visible(rows, keys, k_end, ctx, root, num_nodes, TreeBits, tree_words, GROUP)
        m_i, l_i, acc = _attend(q, k, v, m_i, l_i, acc, qk_scale, visible, True)
        if ROOT_ROW:
            visible_r = _visible(root_rows, keys, k_end, ctx, root, num_nodes, TreeBits, tree_words, GROUP)
            m_r, l_r, acc_r = _attend(q_r, k, v, m_r, l_r, acc_r, qk_scale, visible_r, True, True)

    _store(Out, PartO, PartLse, rows, rows // GROUP < q_len, m_i, l_i, acc, q0, kv_head, split,
           stride_ot, stride_oh, stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, GROUP, HEAD_DIM, SPLIT)
    if ROOT_ROW:
        _store(Out, PartO, PartLse, root_rows, (root_rows == 0) & (q_len > 0), m_r, tl.sum(l_r, 1), acc_r, q0,
               kv_head, split, stride_ot, stride_oh, stride_ps, stride_pt, stride_ph, stride_ls, stride_lt,
               GROUP, HEAD_DIM, SPLIT)


@triton.jit(do_not_specialize=["num_splits", "stride_ls", "stride_lt"])
def _merge_splits_kernel(
    PartO, PartLse, Out, SeqLens, QueryStart, num_splits,
    stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS_P2: tl.constexpr,
):
    """Program (i, j, h): row j of request i, query head h."""
    req = tl.program_id(0)
    j = tl.program_id(1)
    head = tl.program_id(2)
    q0 = tl.load(QueryStart + req)
    if j >= tl.load(QueryStart + req + 1) - q0:
        return
    seq_len = tl.load(SeqLens + req)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N  # as in stage 1 (same BLOCK_N)
    active = tl.arange(0, SPLITS_P2) < tl.cdiv(seq_len, chunk)
    token = (q0 + j).to(tl.int64)
    s = tl.arange(0, SPLITS_P2)
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(PartLse + s * stride_ls + token * stride_lt + head, mask=active, other=float("-inf"))
    weights = tl.exp2(lse - tl.max(lse, 0))
    parts = tl.load(PartO + s[:, None] * stride_ps + token * stride_pt + head * stride_ph + d[None, :],
                    mask=active[:, None], other=0.0)
    o = tl.sum(weights[:, None] * parts, 0) / tl.sum(weights, 0)
    tl.store(Out + token * stride_ot + head * stride_oh + d, o.to(Out.dtype.element_ty))


def tree_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor, meta: TreeAttentionMetadata,
                   scale: float, out: Tensor) -> None:
    """Launch both stages (inputs checked by `vllm_medusa.kernels.tree_attention.tree_attention`)."""
    num_reqs = meta.seq_lens.shape[0]
    plan, splits = meta.plan, meta.num_splits
    head_dim = query.shape[2]
    if splits > 1:
        part_o = torch.empty(splits, *query.shape, dtype=torch.float32, device=query.device)
        part_lse = torch.empty(splits, *query.shape[:2], dtype=torch.float32, device=query.device)
    else:  # stage 1 writes `out` directly
        part_o, part_lse = out, out
    grid = (plan.m_tiles, splits, num_reqs * meta.num_kv_heads)
    _tree_attention_kernel[grid](
        query, key_cache, value_cache, meta.block_table, meta.seq_lens, meta.query_start_loc,
        meta.num_nodes, meta.tree_bits, out, part_o, part_lse,
        scale * _LOG2E, splits, meta.num_kv_heads, meta.tree_bits.shape[1],
        query.stride(0), query.stride(1), *key_cache.stride()[:3], *value_cache.stride()[:3],
        meta.block_table.stride(0), out.stride(0), out.stride(1),
        *part_o.stride()[:3], *part_lse.stride()[:2],
        GROUP=meta.num_heads // meta.num_kv_heads, HEAD_DIM=head_dim, PAGE=key_cache.shape[1],
        BLOCK_M=plan.block_m, ROOT_ROW=plan.root_row, BLOCK_N=plan.block_n, SPLIT=splits > 1,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    if splits > 1:
        _merge_splits_kernel[(num_reqs, meta.max_query_len, meta.num_heads)](
            part_o, part_lse, out, meta.seq_lens, meta.query_start_loc, splits,
            *part_o.stride()[:3], *part_lse.stride()[:2], out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_N=plan.block_n, SPLITS_P2=triton.next_power_of_2(splits),
            num_warps=2,
        )


_BLOCK_E = 1024  # elements of a slot (H_kv * D) per compaction program
# Moving bits needs no float type: copy through the unsigned integer of the element's size (fp8 too).
_COPY_DTYPES = {1: tl.uint8, 2: tl.uint16, 4: tl.uint32}


@triton.jit(do_not_specialize=["num_moves"])
def _compact_kv_kernel(Pointers, Src, Dst, num_moves, stride_b, stride_s, stride_h,
                       PAGE: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                       DTYPE: tl.constexpr, BLOCK_E: tl.constexpr):
    """Program (c, e): elements [e * BLOCK_E, (e+1) * BLOCK_E) of every moved slot of cache c.

    Moves run in list order, each read before its write by the same thread; reading ahead is safe because
    no source is an earlier move's destination (sources lie deeper in the tree than destinations).
    """
    base = tl.load(Pointers + tl.program_id(0)).to(tl.pointer_type(DTYPE))
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    cols = (e // HEAD_DIM) * stride_h + e % HEAD_DIM
    in_slot = e < NUM_KV_HEADS * HEAD_DIM
    for m in range(num_moves):
        src = tl.load(Src + m).to(tl.int64)
        dst = tl.load(Dst + m).to(tl.int64)
        mask = in_slot & (src >= 0)
        row = tl.load(base + (src // PAGE) * stride_b + (src % PAGE) * stride_s + cols, mask=mask)
        tl.store(base + (dst // PAGE) * stride_b + (dst % PAGE) * stride_s + cols, row, mask=mask)


@functools.lru_cache(maxsize=16)
def _pointer_table(pointers: tuple[int, ...], device: torch.device) -> Tensor:
    """Device tensor of the caches' base addresses, built once (outside CUDA-graph capture)."""
    return torch.tensor(pointers, dtype=torch.int64, device=device)


def compact_kv(caches: Sequence[Tensor], src_slots: Tensor, dst_slots: Tensor) -> None:
    """Launch the compaction (inputs checked by `vllm_medusa.kernels.kv_compaction.compact_kv`)."""
    first = caches[0]
    pointers = _pointer_table(tuple(cache.data_ptr() for cache in caches), first.device)
    slot_elems = first.shape[2] * first.shape[3]
    _compact_kv_kernel[(len(caches), triton.cdiv(slot_elems, _BLOCK_E))](
        pointers, src_slots, dst_slots, src_slots.shape[0], *first.stride()[:3],
        PAGE=first.shape[1], NUM_KV_HEADS=first.shape[2], HEAD_DIM=first.shape[3],
        DTYPE=_COPY_DTYPES[first.element_size()], BLOCK_E=_BLOCK_E,
    )
