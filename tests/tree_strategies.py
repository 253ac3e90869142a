"""Hypothesis strategies shared by the tree, candidate and acceptance tests."""

from __future__ import annotations

from hypothesis import strategies as st

RankPath = tuple[int, ...]


@st.composite
def rank_paths(draw: st.DrawFn, max_nodes: int = 12, max_depth: int = 4, max_rank: int = 4) -> list[RankPath]:
    """Random prefix-closed choices, shuffled; ranks need not be contiguous (e.g. (3,) without (0,))."""
    nodes: list[RankPath] = []
    for _ in range(draw(st.integers(1, max_nodes))):
        parent = draw(st.sampled_from([()] + [node for node in nodes if len(node) < max_depth]))
        free = [r for r in range(max_rank + 1) if parent + (r,) not in nodes]
        if free:
            nodes.append(parent + (draw(st.sampled_from(free)),))
    return draw(st.permutations(nodes))
