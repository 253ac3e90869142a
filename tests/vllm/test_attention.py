"""CPU tree attention backend: the sequences handed to vLLM's own kernel when a step has trees, the
layout of vLLM's cache the tree rows read, and the shadow KV copy they read where that layout is unknown."""

import pytest
import torch

pytest.importorskip("vllm")
from vllm import _custom_ops as ops  # noqa: E402

from vllm_medusa.vllm.attention import NATIVE_LAYOUT_ISAS, ShadowKV, native_kv, split_node_rows  # noqa: E402

HEADS, KV_HEADS, HEAD_SIZE, BLOCK = 4, 2, 32, 32


def test_split_node_rows_gives_each_node_row_a_one_key_sequence():
    # request 0: a 5-row prefill chunk, no tree; 1: root + 3 nodes, 20 keys; 2: root + 2 nodes, 9 keys
    query_start_loc = torch.tensor([0, 5, 9, 12], dtype=torch.int32)
    seq_lens = torch.tensor([5, 20, 9], dtype=torch.int32)
    starts, lens, owner = split_node_rows(query_start_loc, seq_lens, torch.tensor([0, 3, 2]))
    assert starts.tolist() == [0, 5, 6, 7, 8, 9, 10, 11, 12]
    assert lens.tolist() == [5, 17, 1, 1, 1, 7, 1, 1]
    assert owner.tolist() == [0, 1, 1, 1, 1, 2, 2, 2]
    assert starts.dtype == torch.int32 and lens.dtype == torch.int32


@pytest.mark.parametrize("isa, block_size, head_size", [("vec", 32, 64), ("vec", 128, 128), ("vec16", 16, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_kv_reads_what_vllms_writer_wrote(isa, block_size, head_size, dtype):
    assert isa in NATIVE_LAYOUT_ISAS
    num_blocks = 5
    kv_cache = torch.zeros(num_blocks, KV_HEADS, block_size, 2 * head_size, dtype=dtype)
    key_cache, value_cache = kv_cache.view(num_blocks, KV_HEADS, 2 * block_size, head_size).chunk(2, dim=2)
    slots = torch.randperm(num_blocks * block_size)[: num_blocks * block_size - 7]
    key = torch.randn(len(slots), KV_HEADS, head_size).to(dtype)
    value = torch.randn(len(slots), KV_HEADS, head_size).to(dtype)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    k_blocks, v_blocks = native_kv(kv_cache, head_size)
    block, offset = slots // block_size, slots % block_size
    assert torch.equal(k_blocks[block, :, :, offset], key)
    assert torch.equal(v_blocks[block, :, offset], value)


def _attention(query, key_cache, value_cache, query_start_loc, seq_lens, block_table):
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(seq_lens), num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_SIZE, seq_lens=seq_lens,
        dtype=torch.float32, query_start_loc=query_start_loc, causal=True, sliding_window_size=-1, isa="vec",
        enable_kv_split=False,
    )
    out = torch.full_like(query, float("nan"))
    ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=query_start_loc,
        seq_lens=seq_lens, scale=HEAD_SIZE**-0.5, causal=True, alibi_slopes=None, sliding_window=-1,
        block_table=block_table, softcap=0.0, scheduler_metadata=metadata, s_aux=None,
    )
    return out


def test_rows_other_than_nodes_are_unchanged_by_the_split():
    """vLLM's kernel on the split sequences gives the same prefill and root rows as on the original ones."""
    torch.manual_seed(0)
    num_blocks = 16
    kv_cache = torch.randn(num_blocks, KV_HEADS, BLOCK, 2 * HEAD_SIZE)
    key_cache, value_cache = kv_cache.view(num_blocks, KV_HEADS, 2 * BLOCK, HEAD_SIZE).chunk(2, dim=2)
    num_nodes = torch.tensor([0, 6, 3, 0])
    rows = torch.tensor([7, 7, 4, 1])  # a prefill chunk, two roots with their nodes, a plain decode row
    seq_lens = torch.tensor([7, 70, 40, 33], dtype=torch.int32)
    query_start_loc = torch.zeros(5, dtype=torch.int32)
    torch.cumsum(rows, 0, out=query_start_loc[1:])
    block_table = torch.randperm(num_blocks)[:12].view(4, 3).int()
    query = torch.randn(int(rows.sum()), HEADS, HEAD_SIZE)

    whole = _attention(query, key_cache, value_cache, query_start_loc, seq_lens, block_table)
    starts, lens, owner = split_node_rows(query_start_loc, seq_lens, num_nodes)
    split = _attention(query, key_cache, value_cache, starts, lens, block_table[owner])

    node_row = torch.zeros(len(query), dtype=torch.bool)
    for end, n in zip(query_start_loc[1:].tolist(), num_nodes.tolist()):
        node_row[end - n : end] = True
    torch.testing.assert_close(split[~node_row], whole[~node_row], rtol=1e-6, atol=1e-6)
    # the node rows are placeholders (one key each), not the causal rows: the recompute overwrites them
    assert not torch.allclose(split[node_row], whole[node_row])
    assert torch.isfinite(split).all()


def test_shadow_writes_held_for_a_step_equal_immediate_writes():
    """A step without trees holds every layer's K/V and writes them at the flush: same shadow, padding
    rows (slot -1) skipped, and the slots survive vLLM refilling its buffer in between."""
    torch.manual_seed(0)
    num_layers, num_blocks = 3, 4
    kv_cache = torch.zeros(num_blocks, KV_HEADS, BLOCK, 2 * HEAD_SIZE)
    slot_mapping = torch.tensor([5, 70, -1, 3])
    kv = torch.randn(num_layers, 2, len(slot_mapping), KV_HEADS, HEAD_SIZE)

    layer_index = {f"layer.{i}": i for i in range(num_layers)}
    immediate = ShadowKV(layer_index=dict(layer_index))
    held = ShadowKV(layer_index=dict(layer_index), may_hold=True, hold=True)
    for i in range(num_layers):
        immediate.write(f"layer.{i}", kv[i, 0], kv[i, 1], slot_mapping, kv_cache)
        held.write(f"layer.{i}", kv[i, 0], kv[i, 1], slot_mapping, kv_cache)
    assert not held.cache.any()
    slot_mapping.fill_(0)  # the runner's slot buffer, refilled by the next step
    held.flush()
    torch.testing.assert_close(held.cache, immediate.cache, rtol=0, atol=0)
    assert immediate.cache[:, [5, 70, 3]].any(-1).all() and not immediate.cache[:, 0].any()
    held.flush()  # nothing held any more: a no-op
    torch.testing.assert_close(held.cache, immediate.cache, rtol=0, atol=0)
