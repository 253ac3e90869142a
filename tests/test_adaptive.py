import numpy as np
import pytest

from vllm_medusa.adaptive import NodeStats, StepCost, choose_num_nodes, node_priors, rank_nodes
from vllm_medusa.tree import TreeSpec


def test_step_cost_interpolates_and_extrapolates():
    cost = StepCost.from_points({1: 1.0, 3: 2.0, 5: 4.0})
    assert cost(2) == pytest.approx(1.5)
    assert cost(7) == pytest.approx(6.0)  # last slope (1.0 per token) continued


def test_step_cost_follows_observed_steps():
    cost = StepCost.from_points({1: 1.0, 16: 1.5, 64: 3.0})
    for _ in range(200):
        cost.observe(16, 3.0)  # real steps cost twice the calibrated forward at 16 tokens
    assert cost(16) == pytest.approx(3.0, rel=0.02)
    # Points no step reached keep the calibration's shape at the scale of their nearest observed point.
    assert cost(1) == pytest.approx(2.0, rel=0.02) and cost(64) == pytest.approx(6.0, rel=0.02)
    for _ in range(200):
        cost.observe(1, 1.0)  # then their own observations take over
    assert cost(1) == pytest.approx(1.0, rel=0.02) and cost(16) == pytest.approx(3.0, rel=0.02)


def test_first_observation_replaces_the_calibration():
    cost = StepCost.linear(base=1.0, per_token=0.0)
    cost.observe(16, 3.0)
    assert cost(16) == pytest.approx(3.0)
    cost.observe(16, 1.0)  # then a running mean
    assert cost(16) == pytest.approx(2.0)


def test_step_cost_round_trips(tmp_path):
    cost = StepCost.linear(0.01, 0.001)
    cost.save(tmp_path / "c.json", {"model": "x"})
    loaded = StepCost.load(tmp_path / "c.json")
    assert np.allclose(loaded(np.arange(1, 100)), cost(np.arange(1, 100)))
    assert StepCost.load(tmp_path / "missing.json") is None


def test_flat_cost_picks_whole_tree_steep_cost_picks_none():
    q = np.array([0.6, 0.4, 0.3, 0.2, 0.1])
    flat = StepCost.linear(base=1.0, per_token=0.0001)
    steep = StepCost.linear(base=0.01, per_token=1.0)  # every extra token costs as much as a step
    assert choose_num_nodes(q, batch=1, other_tokens=0, cost=flat)[0] == 5
    assert choose_num_nodes(q, batch=1, other_tokens=0, cost=steep)[0] == 0


def test_larger_batch_chooses_smaller_tree():
    """Compute-bound past ~64 tokens, as on a GPU: trees must shrink as the batch grows."""
    q = np.array([0.7, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05, 0.05])
    cost = StepCost.from_points({1: 1.0, 16: 1.05, 64: 1.2, 256: 4.0, 1024: 16.0})
    chosen = [choose_num_nodes(q, batch=b, other_tokens=0, cost=cost)[0] for b in (1, 8, 64)]
    assert chosen[0] == len(q)
    assert chosen[0] > chosen[1] > chosen[2]


def test_prefill_tokens_in_the_step_make_speculation_dearer():
    q = np.array([0.5, 0.3, 0.2])
    cost = StepCost.from_points({1: 1.0, 4: 1.1, 100: 1.5, 101: 1.5, 102: 3.0, 200: 6.0})
    assert choose_num_nodes(q, batch=1, other_tokens=0, cost=cost)[0] == 3
    assert choose_num_nodes(q, batch=1, other_tokens=100, cost=cost)[0] == 0


def test_ranking_prefixes_are_subtrees_and_follow_observations():
    tree = TreeSpec.preset("medusa-16")
    stats = NodeStats(tree, node_priors(tree), prior_weight=1.0)
    order, q = rank_nodes(tree, stats.acceptance())
    assert np.all(np.diff(q) <= 1e-12)
    for n in range(1, tree.num_nodes + 1):
        TreeSpec([tree.choices[i] for i in order[:n]])  # validates prefix-closure
    # Observations that favour the second child of the root push it up the ranking.
    second = tree.choices.index((1,))
    verified = np.ones(tree.num_nodes) * 100
    accepted = np.zeros(tree.num_nodes)
    accepted[second] = 95
    stats.observe(verified, accepted)
    order, _ = rank_nodes(tree, stats.acceptance())
    assert order[0] == second


def test_node_priors_from_accuracies_are_path_products():
    tree = TreeSpec([(0,), (1,), (0, 0)])
    acc = np.array([[0.5, 0.2], [0.4, 0.1]])
    assert np.allclose(node_priors(tree, acc), [0.5, 0.2, 0.5 * 0.4])


def test_adaptive_tree_shrinks_with_cost_and_learns_acceptance():
    from vllm_medusa.adaptive import AdaptiveTree

    full = TreeSpec.preset("medusa-16")
    cheap = StepCost.linear(base=1.0, per_token=0.0001)
    tree = AdaptiveTree(full, cheap, node_priors(full))
    assert tree.choose(["greedy"]).num_nodes == 16
    tree.set_cost(StepCost.linear(base=0.001, per_token=1.0))
    assert tree.choose(["greedy"]) is None
    # Fixed mode ignores the cost.
    assert AdaptiveTree(full, tree.cost, node_priors(full), adaptive=False).choose(["greedy"]) is full


def test_observe_acceptance_counts_verified_and_accepted_nodes():
    from vllm_medusa.adaptive import AdaptiveTree

    full = TreeSpec([(0,), (1,), (0, 0), (1, 0)])
    tree = AdaptiveTree(full, StepCost.linear(1.0, 0.0), np.full(4, 0.5))
    sub = tree._subtree((1, 3))[0]  # nodes (1,) and (1, 0)
    # request 0 verified both and accepted (1, 0) (position 2); request 1 verified one, accepted nothing
    tree.observe_acceptance(sub, np.array([2, 1]), np.array([2, 0]), np.array(["greedy", "greedy"]))
    assert tree.stats["greedy"].verified.tolist() == [0, 2, 0, 1]
    assert tree.stats["greedy"].accepted.tolist() == [0, 1, 0, 1]


def test_acceptance_is_learnt_per_rule_and_mixed_by_batch():
    """Greedy steps that accept everything must not make sampled requests look as promising: each rule
    has its own statistics, and a mixed batch ranks nodes by the mean over its requests."""
    from vllm_medusa.adaptive import AdaptiveTree

    full = TreeSpec.preset("medusa-16")
    cheap = StepCost.linear(base=1.0, per_token=0.01)
    tree = AdaptiveTree(full, cheap, node_priors(full))
    everything, nothing = np.full(8, full.num_nodes), np.zeros(8, dtype=np.int64)
    deepest = int(np.argmax(full.depths.numpy()))  # a leaf: its path covers a node at every depth
    for _ in range(50):
        tree.observe_acceptance(full, everything, np.full(8, deepest), np.array(["greedy"] * 8))
        tree.observe_acceptance(full, everything, nothing, np.array(["lossless"] * 8))
    greedy, lossless = tree.acceptance(["greedy"]), tree.acceptance(["lossless"])
    assert greedy.max() > 0.9 and lossless.max() < 0.1
    assert np.allclose(tree.acceptance(["greedy", "lossless", "lossless"]), (greedy + 2 * lossless) / 3)
    assert tree.choose(["greedy"]) is not None
    assert tree.choose(["lossless"] * 4) is None  # trees that are never accepted only cost


def _simulate(tree, step_seconds, batch: int, steps: int) -> list[int]:
    """Run `steps` engine steps: choose a tree, 'run' it for step_seconds(tokens, nodes), report the time.
    Returns the node count chosen at each step (0: no tree)."""
    chosen = []
    for _ in range(steps):
        spec = tree.choose(["greedy"] * batch)
        nodes = 0 if spec is None else spec.num_nodes
        tokens = batch * (1 + nodes)
        tree.observe_step(tokens, nodes > 0, step_seconds(tokens, nodes))
        chosen.append(nodes)
    return chosen


@pytest.mark.parametrize("overhead_vs_gain, expect_trees", [(1.2, False), (0.1, True)])
def test_tree_step_overhead_the_calibration_missed_is_learnt(overhead_vs_gain, expect_trees):
    """The calibrated forward is flat (a tree looks free); real tree steps pay a fixed overhead on top.
    Where that overhead outweighs the extra tokens the full tree brings, the schedule must settle on
    no tree after a few steps; where it is small, it must keep speculating."""
    from vllm_medusa.adaptive import AdaptiveTree

    full = TreeSpec.preset("medusa-16")
    forward = StepCost.linear(base=1.0, per_token=0.001)
    tree = AdaptiveTree(full, forward, node_priors(full))
    tree_overhead = overhead_vs_gain * tree.rule_stats("greedy").acceptance().sum()  # in plain steps: the gain of the full tree

    def step_seconds(tokens: int, nodes: int) -> float:
        return 1.0 + 0.001 * tokens + (tree_overhead if nodes else 0.0)

    chosen = _simulate(tree, step_seconds, batch=1, steps=40)
    settled = chosen[-10:]
    assert chosen[0] > 0  # the calibration alone makes a tree look worth it
    if expect_trees:
        assert min(settled) > 0
    else:
        assert max(settled) == 0


def test_close_calls_still_measure_steps_without_a_tree():
    """A tree that wins by a few percent is chosen, but every explore_every-th such step runs without one
    (so the plain curve keeps being observed); a clear win is never interrupted."""
    from vllm_medusa.adaptive import AdaptiveTree

    full = TreeSpec.preset("medusa-16")
    q_best = node_priors(full).max()
    narrow = StepCost.from_points({1: 1.0, 2: 1.0 + q_best * 0.9, 4096: 4096.0})  # one node: +~q/10 gain
    tree = AdaptiveTree(full, narrow, node_priors(full))
    chosen = [tree.choose(["greedy"]) for _ in range(4 * tree.explore_every)]
    assert [c is None for c in chosen].count(True) == 4 * tree.explore_burst
    assert all(c.num_nodes == 1 for c in chosen if c is not None)
    clear = AdaptiveTree(full, StepCost.linear(1.0, 0.0001), node_priors(full))
    assert all(clear.choose(["greedy"]) is not None for _ in range(4 * clear.explore_every))


def test_a_tree_step_is_never_priced_below_a_plain_step_of_as_many_tokens():
    """An unobserved tree curve still at the bare calibrated forward must not make trees look free next to an
    observed (slower) plain curve: steep plain costs turn speculation off whatever the tree curve says."""
    q = np.array([0.6, 0.4, 0.3])
    steep = StepCost.linear(base=0.01, per_token=1.0)
    free = StepCost.linear(base=0.01, per_token=0.0)
    assert choose_num_nodes(q, batch=1, other_tokens=0, cost=steep, tree_cost=free)[0] == 0
