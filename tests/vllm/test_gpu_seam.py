"""The GPU seam's metadata, checked on CPU: the requests and rows it hands the Triton tree kernel, and the
kernel's PyTorch reference run on that metadata, agree with the CPU path's tree rows (which the exactness
tests verify inside vLLM). The kernel itself is checked against the same reference on the GPU machine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vllm_medusa.kernels.tree_attention import (
    build_tree_attention_metadata,
    select_tree_requests,
    tree_attention_reference,
)
from vllm_medusa.tree import TreeSpec

pytestmark = pytest.mark.vllm

H, H_KV, D, BLOCK = 4, 2, 16, 4


def test_select_tree_requests_picks_rows_of_requests_with_nodes():
    # prefill of 5 rows, a tree request (root + 3 nodes), a plain decode row, a tree request (root + 6 nodes)
    query_start_loc = torch.tensor([0, 5, 9, 10, 17])
    selected = select_tree_requests(query_start_loc, torch.tensor([0, 3, 0, 6]))
    assert selected.requests.tolist() == [1, 3]
    assert selected.rows.tolist() == [5, 6, 7, 8, *range(10, 17)]
    assert selected.query_start_loc.tolist() == [0, 4, 11]
    assert select_tree_requests(query_start_loc, torch.zeros(4, dtype=torch.long)) is None


def test_kernel_metadata_gives_the_cpu_paths_tree_rows():
    from vllm_medusa.vllm.attention import build_tree_rows

    torch.manual_seed(0)
    tree = TreeSpec.preset(8)
    q_lens, num_nodes, contexts = [5, 4, 1, 9], [0, 3, 0, 8], [0, 7, 12, 20]
    seq_lens = torch.tensor([c + q for c, q in zip(contexts, q_lens)])
    query_start_loc = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    blocks_per_req = [(int(s) + BLOCK - 1) // BLOCK for s in seq_lens]
    order = torch.randperm(sum(blocks_per_req) + 3)  # shuffled physical blocks, a few unused
    block_table = torch.zeros(len(q_lens), max(blocks_per_req), dtype=torch.long)
    used = 0
    for i, n in enumerate(blocks_per_req):
        block_table[i, :n] = order[used : used + n]
        used += n
    key_cache = torch.randn(len(order), BLOCK, H_KV, D)
    value_cache = torch.randn(len(order), BLOCK, H_KV, D)
    query = torch.randn(int(query_start_loc[-1]), H, D)
    nodes = torch.tensor(num_nodes)

    # the CPU path: node rows recomputed from a token-major view of the same cache
    rows = build_tree_rows(query_start_loc, seq_lens, block_table, BLOCK, nodes, tree.ancestor_mask)
    flat_k, flat_v = key_cache.reshape(-1, H_KV, D), value_cache.reshape(-1, H_KV, D)
    cpu = F.scaled_dot_product_attention(
        query[rows.query_rows].transpose(1, 2), flat_k[rows.key_slots].transpose(1, 2),
        flat_v[rows.key_slots].transpose(1, 2), attn_mask=rows.mask, scale=D**-0.5, enable_gqa=True,
    ).transpose(1, 2)[rows.query_valid]  # [node rows, H, D]

    # the GPU seam: compact batch of the tree requests, kernel metadata, kernel reference
    selected = select_tree_requests(query_start_loc, nodes)
    lengths = selected.query_start_loc[1:] - selected.query_start_loc[:-1]
    meta = build_tree_attention_metadata(
        block_table[selected.requests], seq_lens[selected.requests], selected.query_start_loc,
        nodes[selected.requests], tree.ancestor_mask, num_heads=H, num_kv_heads=H_KV,
        max_query_len=int(lengths.max()), max_seq_len=int(seq_lens.max()), num_sms=132,
    )
    out = tree_attention_reference(query[selected.rows], key_cache, value_cache, meta, D**-0.5)
    node_rows = torch.cat([torch.arange(int(s) + 1, int(e)) for s, e in zip(meta.query_start_loc[:-1], meta.query_start_loc[1:])])
    torch.testing.assert_close(out[node_rows], cpu, rtol=1e-5, atol=1e-5)
    assert rows.query_rows[rows.query_valid].tolist() == selected.rows[node_rows].tolist()
