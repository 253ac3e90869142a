"""Tree attention and KV compaction kernels.

CPU tests (always run): mask packing and semantics, launch plans, cache views, the PyTorch references.
GPU tests (`-m gpu`, skipped without CUDA and Triton): the Triton kernels against the references on fresh
random inputs each run (the seed is printed on failure): shuffled block tables, ragged context lengths,
truncated trees, GQA, head sizes 64/128, fp16/bf16, both cache layouts, a NaN-poisoned output.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os

import pytest
import torch
import torch.nn.functional as F

from vllm_medusa.kernels import (
    TreeAttentionMetadata,
    build_tree_attention_metadata,
    compact_kv,
    compact_kv_reference,
    pack_tree_mask,
    split_kv_cache,
    tree_attention,
    tree_attention_mask,
    tree_attention_reference,
    unpack_tree_mask,
)
from vllm_medusa.kernels.tree_attention import TilePlan, choose_num_splits, tile_plan
from vllm_medusa.tree import TreeSpec

HAS_GPU = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and Triton")
TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}


# --- random batches -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Batch:
    query: torch.Tensor  # [T + pad, H, D]
    key_cache: torch.Tensor  # [num_blocks, block_size, H_kv, D] view
    value_cache: torch.Tensor
    meta: TreeAttentionMetadata
    num_rows: int  # T: rows that belong to a request (the rest is padding the kernel must not touch)


def random_batch(
    gen: torch.Generator,
    tree: TreeSpec,
    ctx_lens: list[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    dtype: torch.dtype,
    device: str,
    layout: str = "vllm",
    block_size: int = 16,
    num_splits: int | None = None,
) -> Batch:
    """Requests with the given context lengths, each verifying a random prefix of `tree` (0 nodes: decode)."""
    n = tree.num_nodes
    num_nodes = [int(torch.randint(0, n + 1, (), generator=gen)) for _ in ctx_lens]
    num_nodes[0] = n  # at least one full tree (on a short context, the tree mask shows most there)
    q_lens = [k + 1 for k in num_nodes]
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    blocks_per_req = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 5
    perm = torch.randperm(num_blocks, generator=gen)
    block_table = torch.full((len(seq_lens), max(blocks_per_req) + 2), num_blocks - 1, dtype=torch.int32)
    taken = 0
    for i, count in enumerate(blocks_per_req):
        block_table[i, :count] = perm[taken : taken + count]
        taken += count

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    if layout == "vllm":  # logical [nb, H_kv, bs, 2D], stored as vLLM's GPU default [nb, bs, H_kv, 2D]
        kv = randn(num_blocks, block_size, num_kv_heads, 2 * head_size).transpose(1, 2)
        key_cache, value_cache = split_kv_cache(kv, head_size)
    else:  # FlashAttention's [2, nb, bs, H_kv, D]
        kv = randn(2, num_blocks, block_size, num_kv_heads, head_size)
        key_cache, value_cache = kv[0], kv[1]
    starts = torch.tensor([0] + q_lens).cumsum(0)
    num_rows = int(starts[-1])
    meta = build_tree_attention_metadata(
        block_table.to(device),
        torch.tensor(seq_lens),
        starts,
        torch.tensor(num_nodes),
        tree.ancestor_mask,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        max_query_len=n + 1,
        max_seq_len=max(seq_lens),
        num_splits=num_splits,
    )
    query = randn(num_rows + 3, num_heads, head_size)
    return Batch(query, key_cache, value_cache, meta, num_rows)


def fresh_generator() -> tuple[torch.Generator, int]:
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


# --- CPU: metadata and references -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 31, 32, 33, 64, 65, 129])
def test_pack_tree_mask_round_trips(size):
    mask = torch.rand(size, size) < 0.5
    bits = pack_tree_mask(mask)
    assert bits.dtype == torch.int32 and bits.shape == (size, -(-size // 32))
    assert torch.equal(unpack_tree_mask(bits, size), mask)


def test_pack_tree_mask_bit_order():
    mask = torch.zeros(33, 33, dtype=torch.bool)
    mask[0, 0] = mask[1, 31] = mask[2, 32] = True
    bits = pack_tree_mask(mask)
    assert bits[0].tolist() == [1, 0] and bits[1].tolist() == [-(2**31), 0] and bits[2].tolist() == [0, 1]


def brute_force_visible(tree: TreeSpec, q_len: int, seq_len: int, num_nodes: int) -> torch.Tensor:
    """The mask from its definition, walking parents: rows up to the root causal; node t sees the
    prefix up to its root, then its ancestors' keys and its own."""
    ctx, root = seq_len - q_len, q_len - num_nodes - 1
    mask = torch.zeros(q_len, seq_len, dtype=torch.bool)
    for j in range(q_len):
        mask[j, : ctx + min(j, root) + 1] = True
        node = j - root
        while node >= 1:
            mask[j, ctx + root + node] = True
            node = int(tree.parents[node])
    return mask


@pytest.mark.parametrize("num_nodes,extra_rows", [(0, 0), (5, 0), (16, 0), (16, 3)])
def test_tree_attention_mask_matches_definition(num_nodes, extra_rows):
    tree = TreeSpec.preset(16)
    q_len = num_nodes + 1 + extra_rows
    for ctx in (0, 7):
        expected = brute_force_visible(tree, q_len, ctx + q_len, num_nodes)
        assert torch.equal(tree_attention_mask(q_len, ctx + q_len, num_nodes, tree.ancestor_mask), expected)


def test_tree_attention_mask_matches_cpu_backend():
    """Node rows mask as the CPU backend's `build_tree_rows` does (needs vLLM, present in the CPU install)."""
    pytest.importorskip("vllm")
    from vllm_medusa.vllm.attention import build_tree_rows

    tree = TreeSpec.preset(16)
    q_lens, ctx_lens, num_nodes = [17, 1, 9, 17], [40, 3, 0, 18], [16, 0, 8, 16]
    seq_lens = torch.tensor([c + q for c, q in zip(ctx_lens, q_lens)])
    starts = torch.tensor([0] + q_lens).cumsum(0)
    block_table = torch.arange(4 * 8).view(4, 8)
    rows = build_tree_rows(starts, seq_lens, block_table, 16, torch.tensor(num_nodes), tree.ancestor_mask)
    for g, i in enumerate([0, 2, 3]):  # the requests with nodes, in order
        q, s, n = q_lens[i], int(seq_lens[i]), num_nodes[i]
        ours = tree_attention_mask(q, s, n, tree.ancestor_mask)[q - n :]  # the node rows
        assert torch.equal(ours, rows.mask[g, 0, :n, :s])


def test_tile_plan_covers_rows_and_avoids_padding():
    for rows in range(1, 600):
        plan = tile_plan(rows)
        assert plan.rows_covered >= rows
    assert tile_plan(1) == tile_plan(16)
    plan = tile_plan(65)  # 64-node tree + root, one KV head: a 64-row tile and the root's 16-row block
    assert (plan.block_m, plan.m_tiles, plan.root_row) == (64, 1, True)
    with pytest.raises(ValueError, match="single"):
        TilePlan(64, 2, root_row=True)


def test_tile_plan_prefers_64_row_tiles_over_128_row_ones():
    # GQA (4 query heads per KV head): 17, 65, 129 query rows -> 68, 260, 516 rows per KV head
    assert (tile_plan(68).m_tiles, tile_plan(68).block_m) == (2, 64)
    assert (tile_plan(260).m_tiles, tile_plan(260).block_m) == (5, 64)
    assert (tile_plan(516).m_tiles, tile_plan(516).block_m) == (9, 64)
    plan = tile_plan(129)  # MHA, 128 nodes + root: the 128-row tile and the root block stay
    assert (plan.block_m, plan.m_tiles, plan.root_row, plan.num_warps, plan.programs_per_sm) == (128, 1, True, 8, 1)
    assert tile_plan(65).programs_per_sm == 2 and tile_plan(65).rows_per_program == 65


def test_num_splits_fill_the_gpu_only_when_it_pays():
    assert choose_num_splits(32, 65, 16384, 132) > 4  # batch 1: split the context
    assert choose_num_splits(32 * 32, 65, 16384, 132) == 1  # batch 32 fills the GPU already
    assert choose_num_splits(32, 65, 512, 132) == 1  # a short context: partials would cost more
    assert 1 <= choose_num_splits(1, 1, 1 << 20, 132) <= 64


def test_num_splits_fill_whole_waves():
    # MHA, batch 1 / 8, 64 nodes (32 programs per split, two per SM): 8 splits = 256 of 264 slots, as before
    assert choose_num_splits(32, 65, 4161, 132) == 8
    assert choose_num_splits(256, 65, 4161, 132) == 1
    # MHA, 128 nodes (one 128-row program per SM): 4 splits = 128 of 132 SMs, not 8 (two waves)
    assert choose_num_splits(32, 129, 16513, 132, programs_per_sm=1) == 4
    # GQA, 64 nodes as 5x64 tiles, batch 1: 6 splits (240 of 264 slots) where 2 was allowed before
    assert choose_num_splits(40, 64, 4161, 132) == 6
    # ... batch 8 (320 programs, more than a wave): 3 splits fill 91% of their last wave, 1 split 61%
    assert choose_num_splits(320, 64, 16449, 132) == 3
    # GQA, 128 nodes as 9x64 tiles, batch 1: 3 splits fill 216 of 264 slots; 4 would start a second wave
    assert choose_num_splits(72, 64, 4225, 132) == 3
    # GQA decode (N=0), batch 1, 16k: 8 programs per split, 33 splits fill all 264 slots
    assert choose_num_splits(8, 4, 16385, 132) == 33
    # a short context still caps the slices (>= 256 keys and >= 8 keys per row each)
    assert choose_num_splits(40, 64, 1024, 132) == 2


@pytest.mark.parametrize("num_sms", [78, 108, 132])
def test_num_splits_stay_within_their_bounds(num_sms):
    for programs, rows, seq_len, per_sm in itertools.product(
        (1, 8, 24, 40, 72, 256, 320, 1024), (1, 4, 17, 64, 65, 129), (100, 513, 4161, 16449, 1 << 20), (1, 2)
    ):
        splits = choose_num_splits(programs, rows, seq_len, num_sms, per_sm)
        slots = per_sm * num_sms
        assert 1 <= splits <= 64
        if splits > 1:
            assert seq_len // splits >= max(256, 8 * rows)  # each slice pays for its partial output
            assert splits <= max(3, slots // programs)  # no more than a wave, or 3 splits
        if 3 * programs <= slots:  # a split of at most a third of a wave: all programs run in one wave
            assert programs * splits <= slots
        limit = max(1, min(seq_len // max(256, 8 * rows), max(3, slots // programs), 64))
        # the count that fills its last wave best, the fewest of equals
        fill = [programs * s / (-(-programs * s // slots) * slots) for s in range(1, limit + 1)]
        assert fill[splits - 1] == max(fill) and all(f < max(fill) for f in fill[: splits - 1])


def test_build_metadata_shapes():
    tree = TreeSpec.preset(64)
    meta = build_tree_attention_metadata(
        torch.zeros(2, 4, dtype=torch.int64), torch.tensor([100, 70]), torch.tensor([0, 65, 130]),
        torch.tensor([64, 64]), tree.ancestor_mask, num_heads=32, num_kv_heads=8, max_query_len=65,
        max_seq_len=100, num_sms=132,
    )
    assert meta.block_table.dtype == meta.seq_lens.dtype == meta.num_nodes.dtype == torch.int32
    assert meta.tree_bits.shape == (65, 3)
    assert meta.plan.rows_covered >= 65 * 4
    with pytest.raises(ValueError, match="multiple"):
        build_tree_attention_metadata(
            meta.block_table, meta.seq_lens, meta.query_start_loc, meta.num_nodes, tree.ancestor_mask,
            num_heads=6, num_kv_heads=4, max_query_len=65, max_seq_len=100,
        )


def test_split_kv_cache_is_a_view_of_vllm_layout():
    storage = torch.randn(5, 16, 2, 2 * 8)  # vLLM's GPU default order [nb, bs, H_kv, 2D]
    kv = storage.transpose(1, 2)  # the logical [nb, H_kv, bs, 2D] tensor vLLM hands a layer
    key, value = split_kv_cache(kv, 8)
    assert key.shape == value.shape == (5, 16, 2, 8)
    assert key.data_ptr() == storage.data_ptr() and key.stride(-1) == 1
    assert torch.equal(key[3, 7, 1], kv[3, 1, 7, :8]) and torch.equal(value[3, 7, 1], kv[3, 1, 7, 8:])


@pytest.mark.parametrize("num_kv_heads", [4, 1])
def test_reference_matches_per_row_definition(num_kv_heads):
    """The reference against attention computed row by row from the brute-force mask, float32."""
    gen, seed = fresh_generator()
    tree = TreeSpec.preset(16)
    batch = random_batch(gen, tree, [0, 19, 50], num_heads=4, num_kv_heads=num_kv_heads, head_size=16,
                         dtype=torch.float32, device="cpu")
    meta, group = batch.meta, 4 // num_kv_heads
    out = tree_attention_reference(batch.query, batch.key_cache, batch.value_cache, meta, 0.3)
    starts = meta.query_start_loc.tolist()
    for i, (seq_len, n) in enumerate(zip(meta.seq_lens.tolist(), meta.num_nodes.tolist())):
        q_len = starts[i + 1] - starts[i]
        visible = brute_force_visible(tree, q_len, seq_len, n)
        slots = [(int(meta.block_table[i, k // 16]), k % 16) for k in range(seq_len)]
        keys = torch.stack([batch.key_cache[b, o] for b, o in slots])  # [S, H_kv, D]
        values = torch.stack([batch.value_cache[b, o] for b, o in slots])
        for j in range(q_len):
            for h in range(4):
                scores = keys[visible[j], h // group] @ batch.query[starts[i] + j, h] * 0.3
                expected = F.softmax(scores, 0) @ values[visible[j], h // group]
                torch.testing.assert_close(out[starts[i] + j, h], expected, msg=f"seed {seed}")


def accepted_path_moves(tree: TreeSpec, gen: torch.Generator, slot_starts: list[int]) -> tuple[list[int], list[int]]:
    """Moves of random accepted paths, root first (slot_starts[i]: request i's root slot)."""
    src, dst = [], []
    for root_slot in slot_starts:
        node = int(torch.randint(0, tree.num_nodes + 1, (), generator=gen))
        path = []
        while node > 0:
            path.append(node)
            node = int(tree.parents[node])
        for depth, position in enumerate(reversed(path), start=1):
            if position != depth:
                src.append(root_slot + position)
                dst.append(root_slot + depth)
    return src, dst


def test_compact_kv_reference_moves_overlapping_paths():
    cache = torch.arange(8 * 4, dtype=torch.float32).view(8, 4, 1, 1)  # slot s holds s
    # Path (0, 2, 5) of a request rooted at slot 3, then padding: 5 -> 4, then 8 -> 5.
    compact_kv_reference([cache], torch.tensor([5, 8, -1]), torch.tensor([4, 5, 0]))
    assert cache.flatten()[:10].tolist() == [0, 1, 2, 3, 5, 8, 6, 7, 8, 9]


# --- GPU: the Triton kernels ----------------------------------------------------------------------------


# Each case compiles its own kernels (dtype, head size, GQA group, tile plan), so the cases cover every
# dimension without taking the full product: (dtype, head_size, num_heads, num_kv_heads, tree size, layout).
KERNEL_CASES = [
    (torch.bfloat16, 128, 8, 8, 64, "vllm"),  # MHA: 64-row tile + the root in a 16-row block
    (torch.float16, 64, 4, 4, 16, "fa"),  # MHA: 16-row tile + root row, FlashAttention layout
    (torch.bfloat16, 128, 8, 2, 64, "vllm"),  # GQA 4: 260 rows, three 128-row tiles
    (torch.float16, 64, 6, 2, 16, "fa"),  # GQA 3 (not a power of two): 51 rows
    (torch.float16, 128, 8, 8, 4, "vllm"),  # small tree: 5 rows in a 16-row tile
    (torch.bfloat16, 64, 4, 1, 16, "fa"),  # GQA 4, 68 rows in a 128-row tile
]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype,head_size,num_heads,num_kv_heads,tree_size,layout", KERNEL_CASES)
def test_tree_attention_matches_reference(dtype, head_size, num_heads, num_kv_heads, tree_size, layout):
    gen, seed = fresh_generator()
    tree = TreeSpec.preset(tree_size)
    ctx_lens = [0] + [int(c) for c in torch.randint(0, 3000, (5,), generator=gen)] + [1, 15, 16]
    for num_splits in (None, 1, 7):
        batch = random_batch(gen, tree, ctx_lens, num_heads=num_heads, num_kv_heads=num_kv_heads,
                             head_size=head_size, dtype=dtype, device="cuda", layout=layout, num_splits=num_splits)
        args = (batch.query, batch.key_cache, batch.value_cache, batch.meta, head_size**-0.5)
        out = tree_attention(*args, out=torch.full_like(batch.query, float("nan")))
        ref = tree_attention_reference(*args)
        rows = batch.num_rows
        context = f"seed {seed}, splits {batch.meta.num_splits}, plan {batch.meta.plan}"
        assert not out[:rows].isnan().any(), f"unwritten or NaN output rows ({context})"
        assert out[rows:].isnan().all(), f"wrote past the last request's rows ({context})"
        assert relative_error(out[:rows], ref[:rows]) < TOLERANCE[dtype], context
        # The check has teeth: the same batch without the tree mask (causal only) is far off.
        causal = dataclasses.replace(batch.meta, tree_bits=pack_tree_mask(torch.ones_like(tree.ancestor_mask)).cuda())
        assert relative_error(out[:rows], tree_attention_reference(*args[:3], causal, args[4])[:rows]) > 0.05


@pytest.mark.gpu
@needs_gpu
def test_tree_attention_replays_in_a_cuda_graph():
    """A fixed tree gives a static launch: capture once, refill the inputs in place, replay."""
    gen, seed = fresh_generator()
    batch = random_batch(gen, TreeSpec.preset(64), [4000, 700, 0, 2100], num_heads=32, num_kv_heads=8,
                         head_size=128, dtype=torch.bfloat16, device="cuda", num_splits=5)  # merge captured too
    args = (batch.query, batch.key_cache, batch.value_cache, batch.meta, 128**-0.5)
    out = torch.empty_like(batch.query)
    tree_attention(*args, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tree_attention(*args, out=out)
    for _ in range(2):
        for tensor in (batch.query, batch.key_cache, batch.value_cache):
            tensor.copy_(torch.randn(tensor.shape, generator=gen).to(tensor))
        out.fill_(float("nan"))
        graph.replay()
        ref = tree_attention_reference(*args)
        assert relative_error(out[: batch.num_rows], ref[: batch.num_rows]) < 1e-2, f"seed {seed}"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compact_kv_matches_reference(dtype):
    gen, seed = fresh_generator()
    tree, block_size, num_layers = TreeSpec.preset(64), 16, 3
    caches = []
    for _ in range(num_layers):
        kv = torch.randn(40, block_size, 8, 2 * 64, generator=gen).to("cuda", dtype).transpose(1, 2)
        caches.extend(split_kv_cache(kv, 64))
    roots = [0, 70, 150, 300]  # root slot of each request's tree (65 slots each)
    src, dst = accepted_path_moves(tree, gen, roots)
    src, dst = torch.tensor(src + [-1, -1]), torch.tensor(dst + [0, 0])  # padded, as under a CUDA graph
    expected = [cache.clone() for cache in caches]
    compact_kv_reference(expected, src, dst)
    compact_kv(caches, src.cuda(), dst.cuda())
    for got, want in zip(caches, expected):
        assert torch.equal(got, want), f"seed {seed}"
