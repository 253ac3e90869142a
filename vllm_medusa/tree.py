"""Candidate trees ("medusa choices"): which head ranks a verification step feeds, in which order.

A node is a rank path (i1, ..., id): its token is rank i_d among head d's top-k. Tree position 0 is the root
(the last emitted token); positions 1..N are the nodes sorted by depth, then lexicographically, so a parent
always comes before its children and the first n nodes of any tree form a tree themselves (`truncated`).
`TreeSpec` turns the choices into the index tensors that candidate filling, attention and acceptance read.
"""

from __future__ import annotations

import copy
import heapq
import json
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

RankPath = tuple[int, ...]
_TENSOR_FIELDS = ("parents", "depths", "ranks", "ancestor_mask", "paths", "children")

# The Medusa reference tree `mc_sim_7b_63`, listed in the order its greedy construction added the nodes, so
# every prefix of it is prefix-closed. The 64th node, (1, 7), continues its (1, i) run.
_GREEDY_ORDER: tuple[RankPath, ...] = (
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4), (2, 0), (0, 5),
    (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8), (0, 0, 2), (3, 0), (0, 9), (8,),
    (9,), (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0), (2, 1), (0, 0, 4), (0, 0, 5), (0, 0, 0, 0),
    (0, 1, 1), (0, 0, 6), (0, 3, 0), (5, 0), (1, 3), (0, 0, 7), (0, 0, 8), (0, 0, 9), (6, 0), (0, 4, 0),
    (1, 4), (7, 0), (0, 1, 2), (2, 0, 0), (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5), (1, 0, 1), (0, 2, 1),
    (9, 0), (0, 6, 0), (0, 0, 0, 1), (1, 6), (0, 7, 0), (1, 7),
)

# Generic sparse trees, wide at depth 1 and narrow deeper; each is a prefix of the next (a nested family).
PRESETS: dict[str, tuple[RankPath, ...]] = {f"medusa-{n}": _GREEDY_ORDER[:n] for n in (4, 8, 16, 32, 64)}


@dataclass(frozen=True)
class TreeSpec:
    """A validated candidate tree and its index tensors (CPU, int64 unless noted).

    choices:       the N rank paths in topological order (depth, then lexicographic).
    parents:       [N+1] parent position of each position, -1 for the root.
    depths:        [N+1] depth of each position, 0 for the root.
    ranks:         [N+1] rank of the position's token in head (depth-1)'s top-k, -1 for the root.
    ancestor_mask: [N+1, N+1] bool, [i, j] True iff j is i or an ancestor of i.
    paths:         [P, D+1] root-to-leaf positions (column 0 is the root), padded with -1; one row per leaf,
                   rows in depth-first order (lexicographic by the leaf's rank path).
    children:      [N+1, C] children positions in rank order, padded with -1 (C = max fan-out).
    """

    choices: tuple[RankPath, ...]
    parents: Tensor = field(init=False, repr=False, compare=False)
    depths: Tensor = field(init=False, repr=False, compare=False)
    ranks: Tensor = field(init=False, repr=False, compare=False)
    ancestor_mask: Tensor = field(init=False, repr=False, compare=False)
    paths: Tensor = field(init=False, repr=False, compare=False)
    children: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Validating here (not only in from_choices) means no TreeSpec can exist with unchecked choices.
        choices = _canonical(self.choices)
        object.__setattr__(self, "choices", choices)
        for name, value in _index_tensors(choices).items():
            object.__setattr__(self, name, value)

    def to(self, device: torch.device | str) -> TreeSpec:
        """The same tree with its index tensors on `device` (a CUDA-graph step may not copy them there)."""
        moved = copy.copy(self)
        for name in _TENSOR_FIELDS:
            object.__setattr__(moved, name, getattr(self, name).to(device))
        return moved

    @classmethod
    def from_choices(cls, choices: Sequence[Sequence[int]]) -> TreeSpec:
        """Validate rank paths in any order (lists or tuples) and sort them into topological order."""
        return cls(choices)  # type: ignore[arg-type]  # __post_init__ normalises any sequence of sequences

    @classmethod
    def from_json(cls, source: str | Path) -> TreeSpec:
        """Read choices from JSON text (a list of lists) or from a file holding it."""
        text, origin = _json_text(source)
        try:
            choices = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"tree choices in {origin} are not valid JSON: {err}") from None
        return cls.from_choices(choices)

    @classmethod
    def preset(cls, name_or_size: str | int) -> TreeSpec:
        """A preset tree by name ("medusa-16") or by node count (16 or "16")."""
        name = f"medusa-{name_or_size}" if str(name_or_size).isdigit() else str(name_or_size)
        if name not in PRESETS:
            raise ValueError(f"unknown tree preset {name_or_size!r}; choose one of {', '.join(PRESETS)}")
        return cls(PRESETS[name])

    @classmethod
    def chain(cls, depth: int) -> TreeSpec:
        """A single chain of each head's top-1 token, `depth` nodes long (vLLM's built-in Medusa)."""
        if depth < 1:
            raise ValueError(f"a chain tree needs depth >= 1, got {depth}")
        return cls(tuple((0,) * d for d in range(1, depth + 1)))

    @property
    def num_nodes(self) -> int:
        return len(self.choices)

    @property
    def max_depth(self) -> int:
        return len(self.choices[-1])  # topological order ends with the deepest nodes

    @property
    def topk_per_depth(self) -> tuple[int, ...]:
        """How many of head d's top tokens the tree uses, for d = 1..D (max rank at that depth + 1)."""
        top = [0] * self.max_depth
        for path in self.choices:
            top[len(path) - 1] = max(top[len(path) - 1], path[-1] + 1)
        return tuple(top)

    @property
    def topk(self) -> int:
        return max(self.topk_per_depth)

    def to_json(self) -> list[list[int]]:
        """The choices as JSON-ready lists, in topological order."""
        return [list(path) for path in self.choices]

    def truncated(self, num_nodes: int) -> TreeSpec:
        """The tree of the first `num_nodes` nodes; positions 0..num_nodes keep their meaning."""
        if not 1 <= num_nodes <= self.num_nodes:
            raise ValueError(f"cannot truncate a {self.num_nodes}-node tree to {num_nodes} nodes")
        return TreeSpec(self.choices[:num_nodes])


def build_sparse_tree(accuracies: Tensor, num_nodes: int) -> TreeSpec:
    """Grow a tree greedily by the product of head accuracies along each node's path.

    accuracies: [K, k], accuracies[d, r] = probability that rank r of head d+1 is the right token.
    """
    acc = _check_accuracies(accuracies).tolist()
    depth, width = len(acc), len(acc[0])
    capacity = sum(width**d for d in range(1, depth + 1))
    if not 1 <= num_nodes <= capacity:
        raise ValueError(f"num_nodes must be in 1..{capacity} for {depth} heads of top-{width}, got {num_nodes}")
    # Accuracies are <= 1, so no node beats its parent: popping the best frontier node each time picks the
    # num_nodes most likely nodes, which are prefix-closed and maximise expected_accept_length.
    # Heap entries are (-value, path); equal values pop in path order, i.e. ancestors first.
    frontier = [(-acc[0][r], (r,)) for r in range(width)]
    heapq.heapify(frontier)
    chosen: list[RankPath] = []
    while len(chosen) < num_nodes:
        neg_value, path = heapq.heappop(frontier)
        chosen.append(path)
        if len(path) < depth:
            for r in range(width):
                heapq.heappush(frontier, (neg_value * acc[len(path)][r], path + (r,)))
    return TreeSpec(tuple(chosen))


def expected_accept_length(tree: TreeSpec, accuracies: Tensor) -> float:
    """1 + sum over nodes of the product of accuracies along the node's path (accuracies: [K, k])."""
    acc = _check_accuracies(accuracies)
    if acc.shape[0] < tree.max_depth or acc.shape[1] < tree.topk:
        raise ValueError(
            f"accuracies of shape {list(acc.shape)} do not cover a tree of depth {tree.max_depth} "
            f"using top-{tree.topk}"
        )
    node_acc = torch.ones(tree.num_nodes + 1, dtype=torch.float64)  # the root is always "accepted"
    node_acc[1:] = acc[tree.depths[1:] - 1, tree.ranks[1:]]
    along_path = torch.where(tree.ancestor_mask, node_acc, 1.0).prod(dim=-1)  # [N+1]
    return float(along_path.sum())


def _canonical(choices: object) -> tuple[RankPath, ...]:
    """Validate choices and return them as tuples in topological order."""
    if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence):
        raise ValueError(f"tree choices must be a list of rank paths (lists of ints), got {choices!r:.80}")
    paths = tuple(_rank_path(choice, index) for index, choice in enumerate(choices))
    if not paths:
        raise ValueError("tree choices are empty; a tree needs at least one node")
    seen: set[RankPath] = set()
    for path in paths:
        if path in seen:
            raise ValueError(f"tree choices list node {list(path)} twice")
        seen.add(path)
    for path in paths:
        if len(path) > 1 and path[:-1] not in seen:
            raise ValueError(
                f"tree choices are not prefix-closed: {list(path)} is listed but its parent {list(path[:-1])} is not"
            )
    return tuple(sorted(paths, key=lambda path: (len(path), path)))


def _rank_path(choice: object, index: int) -> RankPath:
    if isinstance(choice, (str, bytes)) or not isinstance(choice, Sequence):
        raise ValueError(f"tree choice #{index} must be a list of ranks, got {choice!r:.80}")
    if not choice:
        raise ValueError(f"tree choice #{index} is an empty rank path (the root is implicit; list only nodes)")
    # bool is an Integral to Python, but `[True]` in a tree file is a mistake, not rank 1.
    if not all(isinstance(r, numbers.Integral) and not isinstance(r, bool) for r in choice):
        raise ValueError(f"tree choice #{index} {list(choice)!r} must hold integer ranks")
    ranks = tuple(int(r) for r in choice)
    if min(ranks) < 0:
        raise ValueError(f"tree choice #{index} {list(ranks)} has a negative rank; ranks start at 0")
    return ranks


def _index_tensors(choices: tuple[RankPath, ...]) -> dict[str, Tensor]:
    position = {(): 0, **{path: i + 1 for i, path in enumerate(choices)}}
    parents = [-1] + [position[path[:-1]] for path in choices]
    kids: list[list[int]] = [[] for _ in parents]
    for pos in range(1, len(parents)):
        kids[parents[pos]].append(pos)  # positions are sorted, so siblings come in rank order

    ancestor_mask = torch.eye(len(parents), dtype=torch.bool)
    for pos in range(1, len(parents)):
        ancestor_mask[pos] |= ancestor_mask[parents[pos]]  # parents come first, so their row is complete

    leaves = sorted((pos for pos in range(1, len(parents)) if not kids[pos]), key=lambda pos: choices[pos - 1])
    max_depth = len(choices[-1])
    paths = torch.full((len(leaves), max_depth + 1), -1, dtype=torch.long)
    for row, leaf in enumerate(leaves):
        chain = ancestor_mask[leaf].nonzero().flatten()  # ancestors in position order = root to leaf
        paths[row, : len(chain)] = chain

    fan_out = max(len(k) for k in kids)
    children = torch.full((len(parents), fan_out), -1, dtype=torch.long)
    for pos, k in enumerate(kids):
        children[pos, : len(k)] = torch.tensor(k, dtype=torch.long)

    return {
        "parents": torch.tensor(parents, dtype=torch.long),
        "depths": torch.tensor([0] + [len(path) for path in choices], dtype=torch.long),
        "ranks": torch.tensor([-1] + [path[-1] for path in choices], dtype=torch.long),
        "ancestor_mask": ancestor_mask,
        "paths": paths,
        "children": children,
    }


def _json_text(source: str | Path) -> tuple[str, str]:
    """(JSON text, where it came from) for JSON text or a file path."""
    if isinstance(source, str) and source.lstrip().startswith("["):
        return source, "the given text"
    path = Path(source)
    try:
        return path.read_text(), str(path)
    except OSError as err:
        raise ValueError(f"cannot read tree choices from {path}: {err.strerror or err}") from None


def _check_accuracies(accuracies: Tensor) -> Tensor:
    acc = torch.as_tensor(accuracies, dtype=torch.float64).cpu()
    if acc.dim() != 2 or acc.numel() == 0:
        raise ValueError(f"accuracies must be a non-empty [num_heads, topk] matrix, got shape {list(acc.shape)}")
    if not bool(((acc >= 0) & (acc <= 1)).all()):
        raise ValueError("accuracies must be probabilities in [0, 1]")
    return acc
