"""Adaptive speculation: each step, the tree size that maximises expected tokens per second.

Two measured ingredients, both pure PyTorch/NumPy (no vLLM):

* `StepCost`: t(x), the wall time of one engine step that feeds x tokens, as a piecewise-linear curve
  over a grid of token counts. It starts from a calibration (cached per machine and model) and
  follows real steps online (running mean per grid point, then an exponential moving average).
  Steps with trees pay more than their token count says (tree attention, drafting, acceptance), so
  they follow a curve of their own: `AdaptiveTree.cost` (plain steps) and `.tree_cost` (tree steps).
* `NodeStats`: for every node of the full tree, how often it was accepted when it was verified
  (greedy: node v is accepted iff every token on its path is the base model's choice, whatever its
  siblings are). With q_v that probability, a subtree S yields 1 + sum_{v in S} q_v tokens per step in
  expectation, so the best subtree of each size n is the n nodes of highest q: a nested family.
  Acceptance differs by rule (greedy accepts far more than lossless sampling at T=0.7), so each rule
  keeps its own statistics and a step ranks nodes by their mean q over its requests' rules.

`choose_num_nodes` then picks n (0 = no speculation) maximising
    b * (1 + Q(n)) / t(other + b * (1 + n))
for b requests that would get a tree and `other` tokens (prefill chunks) sharing the step, with t the
plain curve at n = 0 and the tree curve otherwise. Both start from the calibrated forward; the first
tree steps then show what a tree really costs here, and where it does not pay, n = 0 wins. Where a tree
wins narrowly, a few steps still run without one, so both curves stay measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from vllm_medusa.tree import TreeSpec

GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class StepCost:
    """t(x) in seconds for a step of x tokens; `sizes` ascending."""

    sizes: np.ndarray
    seconds: np.ndarray
    smoothing: float = 0.05  # least weight of one observed step in its grid point's average
    observed: np.ndarray = field(init=False)  # [len(sizes)] observation weight received per grid point

    def __post_init__(self) -> None:
        self.observed = np.zeros(len(self.sizes))
        self.calibrated = self.seconds.copy()

    def copy(self) -> StepCost:
        return StepCost(self.sizes.copy(), self.seconds.copy(), self.smoothing)

    def curve(self) -> np.ndarray:
        """[len(sizes)] seconds per grid point. A point no step has reached yet keeps the calibration's shape
        but takes the scale (observed / calibrated) of its nearest observed point: real steps cost more than
        the calibrated forward, and a point left at the bare forward would look far cheaper than its
        observed neighbours."""
        seen = np.flatnonzero(self.observed > 0)
        if len(seen) == 0 or len(seen) == len(self.sizes):
            return self.seconds
        scale = self.seconds[seen] / self.calibrated[seen]
        nearest = seen[np.abs(np.arange(len(self.sizes))[:, None] - seen[None, :]).argmin(axis=1)]
        return np.where(self.observed > 0, self.seconds, self.calibrated * scale[np.searchsorted(seen, nearest)])

    @classmethod
    def from_points(cls, points: dict[int, float]) -> StepCost:
        sizes = np.array(sorted(points), dtype=np.float64)
        return cls(sizes, np.array([points[int(s)] for s in sizes], dtype=np.float64))

    @classmethod
    def linear(cls, base: float, per_token: float) -> StepCost:
        """A prior before any measurement: t(x) = base + per_token * x."""
        return cls.from_points({x: base + per_token * x for x in GRID})

    def __call__(self, tokens: np.ndarray | float) -> np.ndarray:
        x = np.asarray(tokens, dtype=np.float64)
        seconds = self.curve()
        inside = np.interp(x, self.sizes, seconds)
        # Past the last grid point, extend the last segment's slope.
        slope = (seconds[-1] - seconds[-2]) / (self.sizes[-1] - self.sizes[-2])
        return np.where(x > self.sizes[-1], seconds[-1] + slope * (x - self.sizes[-1]), inside)

    def observe(self, tokens: int, seconds: float) -> None:
        """Scale the grid points around `tokens` (linear weights) towards one measured step: a running
        mean over a point's first observations (the first replaces the calibration), then a moving average."""
        ratio = seconds / float(self(tokens))
        self.seconds = self.curve().copy()  # points observed for the first time start from their scaled value
        i = int(np.searchsorted(self.sizes, tokens))
        if i == 0 or i == len(self.sizes):
            neighbours = [(min(i, len(self.sizes) - 1), 1.0)]
        else:
            w_hi = (tokens - self.sizes[i - 1]) / (self.sizes[i] - self.sizes[i - 1])
            neighbours = [(i - 1, 1.0 - w_hi), (i, w_hi)]
        for j, weight in neighbours:
            if weight <= 0.0:  # `tokens` sits on the other grid point
                continue
            self.observed[j] += weight
            rate = max(self.smoothing * weight, weight / self.observed[j])
            self.seconds[j] *= 1.0 + rate * (ratio - 1.0)

    def to_json(self) -> dict:
        return {"sizes": self.sizes.astype(int).tolist(), "seconds": self.seconds.tolist()}

    @classmethod
    def from_json(cls, data: dict) -> StepCost:
        return cls(np.asarray(data["sizes"], dtype=np.float64), np.asarray(data["seconds"], dtype=np.float64))

    def save(self, path: Path, meta: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"meta": meta, **self.to_json()}, indent=1))

    @classmethod
    def load(cls, path: Path) -> StepCost | None:
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError):
            return None


@dataclass
class NodeStats:
    """Per-node acceptance of the full tree, with a prior worth `prior_weight` observations.

    prior: [N] prior acceptance probability of each node (tree order), e.g. the product of the
    heads' measured top-k accuracies along its path (`node_priors`).
    """

    tree: TreeSpec
    prior: np.ndarray
    prior_weight: float = 20.0
    verified: np.ndarray = field(init=False)
    accepted: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.verified = np.zeros(self.tree.num_nodes)
        self.accepted = np.zeros(self.tree.num_nodes)

    def observe(self, verified_counts: np.ndarray, accepted_counts: np.ndarray) -> None:
        """Add one step: [N] how often each node was verified / accepted."""
        self.verified += verified_counts
        self.accepted += accepted_counts

    def acceptance(self) -> np.ndarray:
        """[N] estimated q_v, made monotone along paths (a child never beats its parent)."""
        q = np.concatenate([[1.0], (self.accepted + self.prior_weight * self.prior) / (self.verified + self.prior_weight)])
        parents, depths = self.tree.parents.numpy(), self.tree.depths.numpy()
        for depth in range(2, self.tree.max_depth + 1):  # shallower levels are final first
            level = depths == depth
            q[level] = np.minimum(q[level], q[parents[level]])
        return q[1:]


def rank_nodes(tree: TreeSpec, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Node indices (0-based, tree order) by decreasing q, shallower first on ties, and their q.

    With q monotone along paths (`NodeStats.acceptance`, or a weighted mean of such), every prefix of
    this ranking is prefix-closed, so each is a valid subtree.
    """
    depth = tree.depths.numpy()[1:]
    order = np.lexsort((np.arange(len(q)), depth, -q))
    return order, q[order]


def node_priors(tree: TreeSpec, accuracies: np.ndarray | None = None) -> np.ndarray:
    """[N] prior acceptance per node: product of accuracies[depth-1, rank] along its path.

    Without measured accuracies, a generic decay (top-1 of head d right half the time as often as
    head d-1's, rank r as often as 1/(r+1) of rank 0) keeps shallow, low-rank nodes first.
    """
    depths = tree.depths.numpy()[1:]
    ranks = tree.ranks.numpy()[1:]
    if accuracies is None:
        per_node = 0.6 * 0.8 ** (depths - 1) / (ranks + 1.0)
    else:
        acc = np.asarray(accuracies, dtype=np.float64)
        per_node = np.where(ranks < acc.shape[1], acc[np.minimum(depths - 1, acc.shape[0] - 1), np.minimum(ranks, acc.shape[1] - 1)], 0.0)
    prior = np.ones(tree.num_nodes)
    parents = tree.parents.numpy()
    for i in range(1, tree.num_nodes + 1):
        parent_prior = prior[parents[i] - 1] if parents[i] > 0 else 1.0
        prior[i - 1] = parent_prior * per_node[i - 1]
    return prior


def choose_num_nodes(
    q_ranked: np.ndarray, batch: int, other_tokens: int, cost: StepCost, tree_cost: StepCost | None = None
) -> tuple[int, float]:
    """n in 0..len(q_ranked) maximising batch * (1 + sum(q_ranked[:n])) / t(other + batch * (1 + n)),
    t = `cost` at n = 0 and the larger of `tree_cost` (default: `cost`) and `cost` for n > 0; and the predicted gain of n over
    no speculation (the ratio of the two tokens/s)."""
    if batch <= 0:
        return 0, 1.0
    n = np.arange(len(q_ranked) + 1)
    expected = batch * (1.0 + np.concatenate([[0.0], np.cumsum(q_ranked)]))
    tokens = other_tokens + batch * (1 + n)
    plain = cost(tokens)
    # A tree step costs at least a plain step of as many tokens, whatever the (maybe unobserved) tree curve says.
    seconds = np.where(n == 0, plain, np.maximum(plain, (tree_cost or cost)(tokens)))
    rate = expected / seconds
    best = int(np.argmax(rate))
    return best, float(rate[best] / rate[0])


class AdaptiveTree:
    """The tree of each step: a prefix of the acceptance ranking of the full tree, sized by the cost
    model (or always the full tree when `adaptive` is False), learning from every verified step.

    Requests are described by their acceptance rule (e.g. "greedy", "lossless", "typical"): each rule
    has its own `NodeStats`, all starting from `prior`.
    """

    # A tree predicted to gain less than this over no speculation is a close call that the cost curves'
    # noise could reverse, so `explore_burst` of every `explore_every` such steps run without a tree, in
    # a row, to keep the plain curve measured as recently as the tree curve (otherwise steps without
    # trees stop being observed). In a row, because a step is only timed after a step of its own kind.
    close_call = 1.15
    explore_every = 16
    explore_burst = 3

    def __init__(self, tree: TreeSpec, cost: StepCost, prior: np.ndarray, adaptive: bool = True) -> None:
        self.full = tree
        self.set_cost(cost)
        self.adaptive = adaptive
        self.prior = prior
        self._close_calls = 0
        self.stats: dict[str, NodeStats] = {}
        self._index = {choice: i for i, choice in enumerate(tree.choices)}
        self._subtrees: dict[tuple, tuple[TreeSpec, np.ndarray]] = {}

    def set_cost(self, cost: StepCost) -> None:
        """Start both curves (plain and tree steps) from one calibrated curve."""
        self.cost, self.tree_cost = cost, cost.copy()

    def observe_step(self, tokens: int, with_tree: bool, seconds: float) -> None:
        """One step's wall time, on the curve of its kind."""
        (self.tree_cost if with_tree else self.cost).observe(tokens, seconds)

    def rule_stats(self, rule: str) -> NodeStats:
        if rule not in self.stats:
            self.stats[rule] = NodeStats(self.full, self.prior)
        return self.stats[rule]

    def acceptance(self, rules: Sequence[str]) -> np.ndarray:
        """[N] expected acceptance of each node for a batch of requests with these rules (their mean)."""
        names, counts = np.unique(np.asarray(rules), return_counts=True)
        return sum(c * self.rule_stats(str(r)).acceptance() for r, c in zip(names, counts)) / counts.sum()

    def choose(self, rules: Sequence[str], other_tokens: int = 0) -> TreeSpec | None:
        """This step's tree for requests with these acceptance rules, one per request (None: no speculation)."""
        if not self.adaptive:
            return self.full
        if not len(rules):
            return None
        order, q = rank_nodes(self.full, self.acceptance(rules))
        n, gain = choose_num_nodes(q, len(rules), other_tokens, self.cost, self.tree_cost)
        if n > 0 and gain < self.close_call:
            self._close_calls += 1
            if self._close_calls % self.explore_every < self.explore_burst:
                return None
        if n == 0:
            return None
        return self._subtree(tuple(sorted(order[:n].tolist())))[0]

    def _subtree(self, nodes: tuple[int, ...]) -> tuple[TreeSpec, np.ndarray]:
        """The TreeSpec of some full-tree nodes, and [n] full-tree index of each of its positions 1..n."""
        if nodes not in self._subtrees:
            tree = TreeSpec([self.full.choices[i] for i in nodes])
            full_index = np.array([self._index[c] for c in tree.choices], dtype=np.int64)
            self._subtrees[nodes] = (tree, full_index)
        return self._subtrees[nodes]

    def observe_acceptance(
        self, tree: TreeSpec, num_nodes: np.ndarray, last_positions: np.ndarray, rules: np.ndarray
    ) -> None:
        """One verified step of `tree`: request r (acceptance rule rules[r]) had its first num_nodes[r]
        nodes verified and accepted the path ending at last_positions[r]."""
        if tree is self.full:
            full_index = np.arange(tree.num_nodes)
        else:
            full_index = self._subtree(tuple(sorted(self._index[c] for c in tree.choices)))[1]
        positions = np.arange(1, tree.num_nodes + 1)
        ancestors = tree.ancestor_mask.numpy()
        for rule in np.unique(rules):
            members = rules == rule
            verified = (num_nodes[members, None] >= positions[None, :]).sum(axis=0)
            accepted = ancestors[last_positions[members]].sum(axis=0)[1:]
            v = np.zeros(self.full.num_nodes)
            a = np.zeros(self.full.num_nodes)
            np.add.at(v, full_index, verified)
            np.add.at(a, full_index, accepted)
            self.rule_stats(str(rule)).observe(v, a)
