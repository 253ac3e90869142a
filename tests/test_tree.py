import itertools
import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tree_strategies import rank_paths

from vllm_medusa.tree import PRESETS, TreeSpec, build_sparse_tree, expected_accept_length

torch.set_num_threads(1)

# The Medusa reference tree, as published (mc_sim_7b_63).
MC_SIM_7B_63 = [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0], [0, 5],
    [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0], [0, 9], [8], [9],
    [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5], [0, 0, 0, 0], [0, 1, 1],
    [0, 0, 6], [0, 3, 0], [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0],
    [0, 1, 2], [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0],
    [0, 0, 0, 1], [1, 6], [0, 7, 0],
]


def position_of(tree: TreeSpec) -> dict[tuple[int, ...], int]:
    return {(): 0, **{path: i + 1 for i, path in enumerate(tree.choices)}}


# --- index tensors against brute force from the choices ---------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(rank_paths())
def test_order_is_depth_then_lexicographic_and_input_order_free(choices):
    tree = TreeSpec.from_choices(choices)
    assert tree.choices == tuple(sorted(choices, key=lambda p: (len(p), p)))
    assert TreeSpec.from_choices([list(p) for p in reversed(choices)]) == tree
    assert tree.num_nodes == len(choices)
    assert tree.max_depth == max(map(len, choices))


@settings(max_examples=100, deadline=None)
@given(rank_paths())
def test_ancestor_mask_matches_brute_force(choices):
    tree = TreeSpec.from_choices(choices)
    nodes = [()] + list(tree.choices)
    expected = torch.tensor([[b == a[: len(b)] for b in nodes] for a in nodes])  # b is a prefix of a
    assert torch.equal(tree.ancestor_mask, expected)


@settings(max_examples=100, deadline=None)
@given(rank_paths())
def test_parents_depths_ranks_children(choices):
    tree = TreeSpec.from_choices(choices)
    pos = position_of(tree)
    nodes = [()] + list(tree.choices)
    assert tree.parents.tolist() == [-1] + [pos[p[:-1]] for p in nodes[1:]]
    assert tree.depths.tolist() == [len(p) for p in nodes]
    assert tree.ranks.tolist() == [-1] + [p[-1] for p in nodes[1:]]
    for i, node in enumerate(nodes):
        kids = sorted(p for p in nodes[1:] if p[:-1] == node)  # rank order
        row = tree.children[i].tolist()
        assert row == [pos[k] for k in kids] + [-1] * (len(row) - len(kids))
    assert tree.children.shape[1] == max(sum(p[:-1] == n for p in nodes[1:]) for n in nodes)


@settings(max_examples=100, deadline=None)
@given(rank_paths())
def test_paths_are_root_to_leaf_in_depth_first_order(choices):
    tree = TreeSpec.from_choices(choices)
    pos = position_of(tree)
    leaves = sorted(p for p in tree.choices if not any(q[:-1] == p for q in tree.choices))
    expected = [[pos[leaf[:d]] for d in range(len(leaf) + 1)] for leaf in leaves]
    expected = [row + [-1] * (tree.max_depth + 1 - len(row)) for row in expected]
    assert tree.paths.tolist() == expected


@settings(max_examples=100, deadline=None)
@given(rank_paths(), st.data())
def test_truncated_keeps_the_first_positions(choices, data):
    tree = TreeSpec.from_choices(choices)
    n = data.draw(st.integers(1, tree.num_nodes))
    small = tree.truncated(n)
    assert small.choices == tree.choices[:n]
    assert torch.equal(small.ancestor_mask, tree.ancestor_mask[: n + 1, : n + 1])
    assert torch.equal(small.parents, tree.parents[: n + 1])


def test_topk_properties():
    tree = TreeSpec.from_choices([[0], [3], [0, 1], [3, 0], [0, 1, 2]])
    assert tree.topk_per_depth == (4, 2, 3)
    assert tree.topk == 4
    assert tree.max_depth == 3


def test_chain():
    tree = TreeSpec.chain(3)
    assert tree.choices == ((0,), (0, 0), (0, 0, 0))
    assert tree.paths.tolist() == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="depth >= 1"):
        TreeSpec.chain(0)


def test_tree_is_hashable_and_compares_by_choices():
    assert TreeSpec.from_choices([[1], [0]]) == TreeSpec.from_choices(((0,), (1,)))
    assert len({TreeSpec.chain(2), TreeSpec.chain(2), TreeSpec.chain(3)}) == 2


# --- validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("choices", "message"),
    [
        ([], "empty"),
        ([[0], []], r"#1 is an empty rank path"),
        ([[0], [1], [0]], r"node \[0\] twice"),
        ([[0], [0, 1, 0]], r"not prefix-closed: \[0, 1, 0\] .* parent \[0, 1\]"),
        ([[1, 0]], r"not prefix-closed"),
        ([[0], [-1]], r"#1 \[-1\] has a negative rank"),
        ([[0.5]], "integer ranks"),
        ([[True]], "integer ranks"),
        ([["0"]], "integer ranks"),
        ("[[0]]", "list of rank paths"),
        ([0, 1], r"#0 must be a list of ranks"),
    ],
)
def test_invalid_choices_raise_clear_errors(choices, message):
    with pytest.raises(ValueError, match=message):
        TreeSpec.from_choices(choices)


def test_truncated_out_of_range():
    with pytest.raises(ValueError, match="cannot truncate a 4-node tree to 5"):
        TreeSpec.preset(4).truncated(5)
    with pytest.raises(ValueError, match="to 0 nodes"):
        TreeSpec.preset(4).truncated(0)


# --- JSON -------------------------------------------------------------------------------------------------


def test_json_round_trip_from_text_and_file(tmp_path):
    tree = TreeSpec.preset("medusa-16")
    text = json.dumps(tree.to_json())
    assert TreeSpec.from_json(text) == tree
    file = tmp_path / "tree.json"
    file.write_text(text)
    assert TreeSpec.from_json(file) == tree
    assert TreeSpec.from_json(str(file)) == tree


def test_json_errors_name_the_source(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[[0], [0,")
    with pytest.raises(ValueError, match=r"bad\.json are not valid JSON"):
        TreeSpec.from_json(bad)
    with pytest.raises(ValueError, match=r"cannot read tree choices from .*missing\.json"):
        TreeSpec.from_json(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="not prefix-closed"):
        TreeSpec.from_json("[[0, 0]]")


# --- presets ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [4, 8, 16, 32, 64])
def test_presets_are_valid_and_of_stated_size(size):
    tree = TreeSpec.preset(size)
    assert tree.num_nodes == size == len(PRESETS[f"medusa-{size}"])
    assert TreeSpec.preset(f"medusa-{size}") == TreeSpec.preset(str(size)) == tree
    width = [int((tree.depths == d).sum()) for d in range(tree.max_depth + 1)]  # nodes per depth, root = 1
    fan_out = [below / above for above, below in zip(width, width[1:])]
    assert fan_out == sorted(fan_out, reverse=True), "sparse trees branch most near the root"
    assert tree.topk <= 10


def test_presets_are_nested_and_the_largest_holds_the_reference_tree():
    sets = [set(PRESETS[f"medusa-{n}"]) for n in (4, 8, 16, 32, 64)]
    assert all(a < b for a, b in zip(sets, sets[1:]))
    reference = {tuple(p) for p in MC_SIM_7B_63}
    assert len(reference) == 63 and reference < sets[-1]


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown tree preset 'medusa-5'.*medusa-64"):
        TreeSpec.preset("medusa-5")
    with pytest.raises(ValueError, match="unknown tree preset 7"):
        TreeSpec.preset(7)


# --- sparse tree builder ----------------------------------------------------------------------------------

# Per-head accuracies of ranks 0..2 for 3 heads. Path products, largest first:
# (0)=.7, (0,0)=.7*.6=.42, (0,0,0)=.42*.5=.21, (1)=.2, (1,0)=.2*.6=.12, (0,1)=.7*.1=.07, (2)=.05, ...
HAND_ACCURACIES = torch.tensor([[0.7, 0.2, 0.05], [0.6, 0.1, 0.02], [0.5, 0.1, 0.01]], dtype=torch.float64)


def test_builder_picks_the_obvious_nodes():
    tree = build_sparse_tree(HAND_ACCURACIES, 5)
    assert set(tree.choices) == {(0,), (0, 0), (0, 0, 0), (1,), (1, 0)}
    # 1 + .7 + .42 + .21 + .2 + .12
    assert expected_accept_length(tree, HAND_ACCURACIES) == pytest.approx(2.65)
    assert build_sparse_tree(HAND_ACCURACIES, 6).choices == TreeSpec.from_choices(tree.choices + ((0, 1),)).choices


def test_expected_accept_length_of_a_chain():
    # 1 + .7 + .7*.6 + .7*.6*.5
    assert expected_accept_length(TreeSpec.chain(3), HAND_ACCURACIES) == pytest.approx(1 + 0.7 + 0.42 + 0.21)


def all_prefix_closed_trees(depth: int, width: int, size: int):
    universe = [p for d in range(1, depth + 1) for p in itertools.product(range(width), repeat=d)]
    for subset in itertools.combinations(universe, size):
        nodes = set(subset)
        if all(len(p) == 1 or p[:-1] in nodes for p in subset):
            yield TreeSpec.from_choices(subset)


@pytest.mark.parametrize("size", [3, 4, 5])
def test_builder_is_optimal_among_all_small_trees(size):
    accuracies = torch.rand(2, 3, generator=torch.Generator().manual_seed(size), dtype=torch.float64)
    best = expected_accept_length(build_sparse_tree(accuracies, size), accuracies)
    others = [expected_accept_length(t, accuracies) for t in all_prefix_closed_trees(2, 3, size)]
    assert len(others) > 10
    assert best == pytest.approx(max(others))


def random_tree(rng: random.Random, depth: int, width: int, size: int) -> TreeSpec:
    nodes: list[tuple[int, ...]] = []
    while len(nodes) < size:
        parent = rng.choice([()] + [p for p in nodes if len(p) < depth])
        child = parent + (rng.randrange(width),)
        if child not in nodes:
            nodes.append(child)
    return TreeSpec.from_choices(nodes)


def test_builder_beats_random_trees_of_the_same_size():
    gen = torch.Generator().manual_seed(0)
    # Decreasing with rank, like measured head accuracies.
    accuracies = torch.rand(4, 6, generator=gen, dtype=torch.float64).sort(dim=1, descending=True).values * 0.8
    rng = random.Random(0)
    for size in (8, 16, 32):
        best = expected_accept_length(build_sparse_tree(accuracies, size), accuracies)
        for _ in range(100):
            assert expected_accept_length(random_tree(rng, 4, 6, size), accuracies) <= best + 1e-12


def test_builder_validates_its_input():
    with pytest.raises(ValueError, match=r"num_nodes must be in 1\.\.12 for 2 heads of top-3"):
        build_sparse_tree(HAND_ACCURACIES[:2], 13)
    with pytest.raises(ValueError, match="probabilities"):
        build_sparse_tree(HAND_ACCURACIES * 2, 3)
    with pytest.raises(ValueError, match=r"\[num_heads, topk\] matrix, got shape \[3\]"):
        build_sparse_tree(HAND_ACCURACIES[0], 3)
    with pytest.raises(ValueError, match="do not cover a tree of depth 3"):
        expected_accept_length(TreeSpec.chain(3), HAND_ACCURACIES[:2])
