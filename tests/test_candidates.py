import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tree_strategies import rank_paths

from vllm_medusa.candidates import fill_tree
from vllm_medusa.tree import TreeSpec

torch.set_num_threads(1)


def fill_tree_by_loop(tree: TreeSpec, root_tokens: torch.Tensor, topk_tokens: torch.Tensor) -> torch.Tensor:
    """Reference: one request and one node at a time, reading the rank path directly."""
    rows = []
    for b in range(topk_tokens.shape[0]):
        row = [int(root_tokens[b])]
        for path in tree.choices:
            row.append(int(topk_tokens[b, len(path) - 1, path[-1]]))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long).reshape(topk_tokens.shape[0], tree.num_nodes + 1)


@settings(max_examples=100, deadline=None)
@given(rank_paths(), st.integers(0, 5), st.integers(0, 2), st.integers(0, 2**31))
def test_fill_tree_matches_an_explicit_loop(choices, batch, extra_k, seed):
    tree = TreeSpec.from_choices(choices)
    gen = torch.Generator().manual_seed(seed)
    heads, k = tree.max_depth + 1, tree.topk + extra_k  # the heads may offer more than the tree uses
    topk_tokens = torch.randint(-1, 1000, (batch, heads, k), generator=gen)  # -1: a missing candidate
    root_tokens = torch.randint(0, 1000, (batch,), generator=gen)
    filled = fill_tree(tree, root_tokens, topk_tokens)
    assert filled.dtype == torch.long
    assert torch.equal(filled, fill_tree_by_loop(tree, root_tokens, topk_tokens))


def test_fill_tree_hand_example():
    tree = TreeSpec.from_choices([[0], [1], [1, 0]])
    topk_tokens = torch.tensor([[[10, 11], [20, 21]], [[30, 31], [40, 41]]])  # [B=2, K=2, k=2]
    assert fill_tree(tree, torch.tensor([7, 8]), topk_tokens).tolist() == [[7, 10, 11, 20], [8, 30, 31, 40]]


@pytest.mark.parametrize(
    ("root_shape", "topk_shape", "message"),
    [
        ((2,), (2, 1, 10), "needs 2 heads with top-2 tokens, got top-10 tokens from 1 heads"),
        ((2,), (2, 2, 1), "needs 2 heads with top-2 tokens, got top-1 tokens from 2 heads"),
        ((3,), (2, 2, 2), r"root_tokens must be \[2\]"),
        ((2,), (2, 4), r"must be \[batch, heads, k\]"),
    ],
)
def test_fill_tree_rejects_bad_shapes(root_shape, topk_shape, message):
    tree = TreeSpec.from_choices([[0], [1], [1, 0]])
    with pytest.raises(ValueError, match=message):
        fill_tree(tree, torch.zeros(root_shape, dtype=torch.long), torch.zeros(topk_shape, dtype=torch.long))
