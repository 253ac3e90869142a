import math
import random
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare
from tree_strategies import rank_paths

from vllm_medusa.acceptance import (
    Acceptance,
    accept_greedy,
    accept_greedy_targets,
    accept_lossless,
    accept_typical,
    sample_from_probs,
)
from vllm_medusa.tree import TreeSpec

torch.set_num_threads(1)

# --- sample_from_probs ------------------------------------------------------------------------------------


def test_sampler_is_exact_on_a_uniform_grid():
    probs = torch.tensor([0.125, 0.0, 0.375, 0.5, 0.0])  # dyadic: no rounding anywhere
    grid = (torch.arange(1024) + 0.5) / 1024
    drawn = sample_from_probs(probs.expand(1024, -1), grid)
    assert torch.bincount(drawn, minlength=5).tolist() == [128, 0, 384, 512, 0]


def test_sampler_never_returns_a_token_without_mass_or_past_the_vocabulary():
    probs = torch.tensor([0.0, 0.3, 0.0, 0.7, 0.0, 0.0])
    edges = torch.tensor([0.0, 1e-12, 0.31, 0.9999999, 1.0 - 2**-53, 1.0], dtype=torch.float64)
    assert sample_from_probs(probs.expand(6, -1), edges).tolist() == [1, 1, 3, 3, 3, 3]
    # float32 softmax over a large vocabulary does not sum to exactly 1; u near 1 must still land in range.
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(64, 5000, generator=gen) * 3, dim=-1)
    probs[:, -100:] = 0.0
    drawn = sample_from_probs(probs, torch.full((64,), 0.9999999))
    assert bool((drawn < 4900).all()) and bool((probs.gather(1, drawn[:, None]) > 0).all())


def test_sampler_takes_any_leading_shape_and_unnormalised_probs():
    gen = torch.Generator().manual_seed(1)
    probs = torch.rand(2, 3, 7, generator=gen)
    uniforms = torch.rand(2, 3, generator=gen)
    drawn = sample_from_probs(probs, uniforms)
    assert drawn.shape == (2, 3) and drawn.dtype == torch.long
    flat = sample_from_probs(probs.reshape(6, 7) / probs.reshape(6, 7).sum(-1, keepdim=True), uniforms.reshape(6))
    assert torch.equal(drawn.reshape(6), flat)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=8).filter(any), st.floats(0, 1, exclude_max=True))
def test_sampler_inverts_the_cdf(weights, u):
    index = int(sample_from_probs(torch.tensor(weights, dtype=torch.float64), torch.tensor(u)))
    total = sum(weights)
    assert sum(weights[:index]) <= u * total < sum(weights[: index + 1])


# --- pure-Python references: recursive walks over the children of each node ------------------------------


def softmax(row: list[float], temperature: float) -> list[float]:
    t = max(temperature, 1e-5)
    top = max(row)
    weights = [math.exp((x - top) / t) for x in row]
    return [w / sum(weights) for w in weights]


def inverse_cdf(probs: list[float], u: float) -> int:
    cumulative = 0.0
    for index, p in enumerate(probs):
        cumulative += p
        if cumulative > u * sum(probs):
            return index
    return max(i for i, p in enumerate(probs) if p > 0)


def children_by_position(tree: TreeSpec) -> dict[int, list[int]]:
    """Children of each position in rank order, from the rank paths alone."""
    position = {(): 0, **{path: i + 1 for i, path in enumerate(tree.choices)}}
    kids: dict[int, list[int]] = {p: [] for p in position.values()}
    for path in sorted(tree.choices):
        kids[position[path[:-1]]].append(position[path])
    return kids


def best_path(tree: TreeSpec, ok: Callable[[int, int], bool], score: Callable[[int, int], float]) -> list[int]:
    """Positions of the best all-ok path below the root: longest, then highest total score; a later path
    replaces the best only if strictly better, so ties go to the first one depth-first."""
    kids = children_by_position(tree)

    def below(parent: int) -> tuple[list[int], tuple[int, float]]:
        best, best_key = [], (0, 0.0)
        for child in kids[parent]:
            if ok(parent, child):
                tail, (length, total) = below(child)
                key = (length + 1, total + score(parent, child))
                if key > best_key:
                    best, best_key = [child] + tail, key
        return best, best_key

    return [0] + below(0)[0]


def greedy_reference(tree, tokens: list[int], logits: list[list[float]]) -> tuple[list[int], list[int]]:
    def argmax(row):
        return max(range(len(row)), key=row.__getitem__)

    path = best_path(tree, lambda parent, child: tokens[child] == argmax(logits[parent]), lambda *_: 0.0)
    return [tokens[p] for p in path[1:]] + [argmax(logits[path[-1]])], path


def typical_reference(tree, tokens, logits, temperature, eps, delta, u) -> tuple[list[int], list[int]]:
    probs = [softmax(row, temperature) for row in logits]

    def ok(parent: int, child: int) -> bool:
        entropy = -sum(p * math.log(p) for p in probs[parent] if p > 0)
        return tokens[child] >= 0 and probs[parent][tokens[child]] > min(eps, delta * math.exp(-entropy))

    path = best_path(tree, ok, lambda parent, child: math.log(probs[parent][tokens[child]]))
    return [tokens[p] for p in path[1:]] + [inverse_cdf(probs[path[-1]], u)], path


def lossless_reference(tree, tokens, logits, temperature, uniforms) -> tuple[list[int], list[int]]:
    kids = children_by_position(tree)
    path, emitted = [0], []
    for u in uniforms:
        emitted.append(inverse_cdf(softmax(logits[path[-1]], temperature), u))
        carriers = [c for c in kids[path[-1]] if tokens[c] == emitted[-1]]
        if not carriers:
            break
        path.append(carriers[0])
    return emitted, path


def assert_matches(result: Acceptance, expected: list[tuple[list[int], list[int]]], width: int) -> None:
    def pad(row):
        return row + [-1] * (width - len(row))

    assert result.tokens.tolist() == [pad(tokens) for tokens, _ in expected]
    assert result.path.tolist() == [pad(path) for _, path in expected]
    assert result.num_emitted.tolist() == [len(tokens) for tokens, _ in expected]


# --- random trees with planted matches --------------------------------------------------------------------


def random_case(choices, batch: int, vocab: int, seed: int) -> tuple[TreeSpec, torch.Tensor, torch.Tensor]:
    """Random logits and tokens, with each request's tokens on one root-to-node path set to the argmax at
    their parent, preferably a node of depth >= 2 off the first branch; about 1 node in 8 is missing (-1)."""
    tree = TreeSpec.from_choices(choices)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    logits = torch.randn(batch, tree.num_nodes + 1, vocab, generator=gen)
    tokens = torch.randint(0, vocab, (batch, tree.num_nodes + 1), generator=gen)
    position = {(): 0, **{path: i + 1 for i, path in enumerate(tree.choices)}}
    deep = [p for p in tree.choices if len(p) >= 2 and any(p)] or list(tree.choices)
    for b in range(batch):
        target = rng.choice(deep)
        for d in range(1, len(target) + 1):
            tokens[b, position[target[:d]]] = logits[b, position[target[: d - 1]]].argmax()
    missing = torch.rand(tokens.shape, generator=gen) < 0.125
    missing[:, 0] = False
    return tree, tokens.masked_fill(missing, -1), logits


case_args = (rank_paths(max_nodes=16), st.integers(1, 4), st.integers(2, 6), st.integers(0, 2**31))


@settings(max_examples=200, deadline=None)
@given(*case_args)
def test_greedy_matches_recursive_walk(choices, batch, vocab, seed):
    tree, tokens, logits = random_case(choices, batch, vocab, seed)
    expected = [greedy_reference(tree, tokens[b].tolist(), logits[b].tolist()) for b in range(batch)]
    assert_matches(accept_greedy(tree, tokens, logits), expected, tree.max_depth + 1)
    from_targets = accept_greedy_targets(tree, tokens, logits.argmax(-1))
    assert_matches(from_targets, expected, tree.max_depth + 1)


# Typical and lossless compare float32 decisions with float64 references, which could disagree within
# rounding of a threshold; derandomize keeps the examples fixed so the suite cannot flake.
@settings(max_examples=100, deadline=None, derandomize=True)
@given(*case_args)
def test_typical_matches_recursive_walk(choices, batch, vocab, seed):
    tree, tokens, logits = random_case(choices, batch, vocab, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    temperature = 0.3 + 1.7 * torch.rand(batch, generator=gen)
    eps = 0.02 + 0.28 * torch.rand(batch, generator=gen)
    delta = 0.1 + 0.5 * torch.rand(batch, generator=gen)
    uniforms = torch.rand(batch, generator=gen)
    result = accept_typical(tree, tokens, logits, temperature, eps, delta, uniforms=uniforms)
    expected = [
        typical_reference(
            tree, tokens[b].tolist(), logits[b].tolist(), *(float(x[b]) for x in (temperature, eps, delta, uniforms))
        )
        for b in range(batch)
    ]
    assert_matches(result, expected, tree.max_depth + 1)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(*case_args)
def test_lossless_matches_recursive_walk(choices, batch, vocab, seed):
    tree, tokens, logits = random_case(choices, batch, vocab, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    temperature = 0.3 + 1.7 * torch.rand(batch, generator=gen)
    uniforms = torch.rand(batch, tree.max_depth + 1, generator=gen)
    result = accept_lossless(tree, tokens, logits, temperature, uniforms)
    expected = [
        lossless_reference(tree, tokens[b].tolist(), logits[b].tolist(), float(temperature[b]), uniforms[b].tolist())
        for b in range(batch)
    ]
    assert_matches(result, expected, tree.max_depth + 1)


def test_greedy_finds_a_deep_match_off_the_first_branch_and_stops_at_missing_nodes():
    tree = TreeSpec.preset(32)
    pos = {path: i + 1 for i, path in enumerate(tree.choices)}
    logits = torch.randn(2, tree.num_nodes + 1, 50, generator=torch.Generator().manual_seed(0))
    target = logits.argmax(-1)
    tokens = (target[:, tree.parents.clamp(min=0)] + 1) % 50  # nothing matches...
    for node in [(0,), (1,), (1, 0), (1, 0, 0)]:  # ...except (0,) and the chain (1,) -> (1, 0) -> (1, 0, 0)
        parent = pos.get(node[:-1], 0)
        tokens[:, pos[node]] = target[:, parent]
    tokens[1, pos[(1, 0)]] = -1  # request 1: the chain is cut; (0,) and (1,) tie at depth 1, (0,) is first
    result = accept_greedy(tree, tokens, logits)
    deep = [pos[(1,)], pos[(1, 0)], pos[(1, 0, 0)]]
    assert result.path.tolist() == [[0, *deep], [0, pos[(0,)], -1, -1]]
    assert result.tokens.tolist() == [
        [*tokens[0, deep].tolist(), int(target[0, deep[-1]])],
        [int(tokens[1, pos[(0,)]]), int(target[1, pos[(0,)]]), -1, -1],
    ]
    assert result.num_emitted.tolist() == [4, 2]


# --- typical acceptance: hand-computed fixtures -----------------------------------------------------------


def log(*probs: float) -> list[float]:
    return [math.log(p) if p > 0 else -math.inf for p in probs]


def test_typical_prefers_longer_then_likelier_paths():
    # Positions: 1 = (0,), 2 = (1,), 3 = (0, 0), 4 = (1, 0). Distributions p at each position:
    #   root: [.5, .3, .1, .1]  H = .34657 + .36119 + 2 * .23026 = 1.16828, .3 * e^-H = .09327 -> threshold .09
    #   pos1: [.5, .5, 0, 0]    H = ln 2,  .3 * e^-H = .15    -> threshold .09
    #   pos2: [.05, .05, .85, .05]  H = 3 * .14979 + .13814 = .58751, .3 * e^-H = .16671 -> threshold .09
    #   pos4: [.1, .2, .3, .4]  (only for the bonus token; CDF .1 .3 .6 1)
    tree = TreeSpec.from_choices([[0], [1], [0, 0], [1, 0]])
    logits = torch.tensor([log(0.5, 0.3, 0.1, 0.1), log(0.5, 0.5, 0, 0), log(0.05, 0.05, 0.85, 0.05),
                           log(0.25, 0.25, 0.25, 0.25), log(0.1, 0.2, 0.3, 0.4)]).expand(3, -1, -1)
    tokens = torch.tensor([
        # All four nodes ok. Paths [0,1,3]: ln .5 + ln .5 = -1.38629; [0,2,4]: ln .3 + ln .85 = -1.36649.
        # Both have length 2, so the higher sum wins: [0,2,4], although (0,) alone is likelier than (1,).
        [3, 0, 1, 0, 2],
        # pos3 carries token 2, p = 0 under pos1: [0,1] has length 1 (sum -0.69) and loses to [0,2,4].
        [3, 0, 1, 2, 2],
        # pos1 missing, so pos3 is unreachable; pos4's token 0 has p .05 < .09: accept pos2 only.
        [3, -1, 1, 0, 0],
    ])
    # Bonus: u = .25 -> token 1 and u = .95 -> token 3 under pos4; u = .5 under pos2 (CDF .05 .1 .95) -> token 2.
    result = accept_typical(tree, tokens, logits, torch.ones(3), uniforms=torch.tensor([0.25, 0.95, 0.5]))
    assert result.path.tolist() == [[0, 2, 4], [0, 2, 4], [0, 2, -1]]
    assert result.tokens.tolist() == [[1, 2, 1], [1, 2, 3], [1, 2, -1]]
    assert result.num_emitted.tolist() == [3, 3, 2]


def test_typical_threshold_is_the_smaller_of_eps_and_the_entropy_term():
    # Root p = [.2, .15, .15, .15, .15, .1, .06, .04];
    # H = .32189 + 4 * .28457 + .23026 + .16881 + .12876 = 1.98798, e^-H = .13697.
    #   eps .09, delta .3: threshold min(.09, .04109) = .04109 -> token 6 (.06) ok, token 7 (.04) not
    #   eps .09, delta .6: threshold min(.09, .08218) = .08218 -> token 6 rejected
    #   eps .05, delta .6: threshold min(.05, .08218) = .05    -> token 6 ok
    # The bonus uses u = 0: the first token with mass, 7 under pos1 (all mass on 7), 0 under the root.
    tree = TreeSpec.from_choices([[0]])
    logits = torch.tensor([log(0.2, 0.15, 0.15, 0.15, 0.15, 0.1, 0.06, 0.04), log(0, 0, 0, 0, 0, 0, 0, 1)])
    tokens = torch.tensor([[0, 6], [0, 6], [0, 6], [0, 7]])
    result = accept_typical(
        tree, tokens, logits.expand(4, -1, -1), torch.ones(4),
        eps=torch.tensor([0.09, 0.09, 0.05, 0.09]), delta=torch.tensor([0.3, 0.6, 0.6, 0.3]),
        uniforms=torch.zeros(4),
    )
    assert result.tokens.tolist() == [[6, 7], [0, -1], [6, 7], [0, -1]]


def test_typical_temperature_flips_the_decision_and_scales_the_bonus():
    # Root p = [.8, .1, .05, .05], the node carries token 2.
    #   T = 1: p(2) = .05; H = .70835, .3 * e^-H = .14774 -> threshold .09: rejected; bonus from the root,
    #          u = .85 with CDF .8 .9 -> token 1.
    #   T = 2: p ~ sqrt(p) = [.89443, .31623, .22361, .22361] / 1.65787 = [.5395, .19074, .13488, .13488];
    #          H = .33293 + .31603 + 2 * .27021 = 1.18938, .3 * e^-H = .09132 -> threshold .09: .13488 ok.
    #          Bonus from pos1 at T = 2: [.64, .16, .16, .04] -> [.8, .4, .4, .2] / 1.8 = [.4444, .2222, ...],
    #          u = .5 -> token 1 (at T = 1 it would be token 0, as .64 > .5).
    #   T = 0: one-hot on token 0 at the root: rejected; bonus is the argmax 0 whatever u (.99).
    tree = TreeSpec.from_choices([[0]])
    logits = torch.tensor([log(0.8, 0.1, 0.05, 0.05), log(0.64, 0.16, 0.16, 0.04)]).expand(3, -1, -1)
    tokens = torch.tensor([[1, 2]] * 3)
    result = accept_typical(
        tree, tokens, logits, torch.tensor([1.0, 2.0, 0.0]), uniforms=torch.tensor([0.85, 0.5, 0.99])
    )
    assert result.tokens.tolist() == [[1, -1], [2, 1], [0, -1]]
    assert result.num_emitted.tolist() == [1, 2, 1]


# --- lossless sampling: the emitted tokens follow the base model ------------------------------------------

VOCAB = 4
# Depth 3, and each step's draws reach depth 2 or deeper often (asserted below).
MARKOV_TREE = TreeSpec.from_choices([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0]])


def markov_tables(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The base model p(next | last two tokens) as a [V, V, V] table, and a draft table close to it (the
    tree carries the draft's top tokens, so it holds the likely continuations without being perfect)."""
    gen = torch.Generator().manual_seed(seed)
    gamma = -torch.rand(2, VOCAB, VOCAB, VOCAB, generator=gen, dtype=torch.float64).log().sum(0)  # Gamma(2)
    base = gamma / gamma.sum(-1, keepdim=True)  # Dirichlet(2, ..., 2) rows
    noise = torch.rand(VOCAB, VOCAB, VOCAB, generator=gen, dtype=torch.float64)
    return base, 0.7 * base + 0.3 * noise / noise.sum(-1, keepdim=True)


def draft_tree(tree: TreeSpec, draft: torch.Tensor, prev: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """[B, N+1] tree tokens: node i holds the draft's rank-r token given the context of its parent."""
    tokens = torch.zeros(root.shape[0], tree.num_nodes + 1, dtype=torch.long)
    tokens[:, 0] = root
    for i in range(1, tree.num_nodes + 1):
        parent = int(tree.parents[i])
        before = prev if parent == 0 else tokens[:, int(tree.parents[parent])]
        order = draft[before, tokens[:, parent]].argsort(dim=-1, descending=True)
        tokens[:, i] = order[:, int(tree.ranks[i])]
    return tokens


def tree_logits(tree: TreeSpec, base: torch.Tensor, prev: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, N+1, V] base-model logits at each position: log p(next | root + path to that position)."""
    before = tokens[:, tree.parents.clamp(min=0)]
    before[:, 0] = prev
    return base[before, tokens].log().float()


Sampler = Callable[[TreeSpec, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], Acceptance]


def first_tokens(sample: Sampler, prev: torch.Tensor, root: torch.Tensor, temperature: float, seed: int = 0):
    """Decode with `sample` until every request has 3 tokens. Returns ([B, 3] first tokens, [B] tokens emitted
    by the first step)."""
    base, draft = markov_tables(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    batch, depth = root.shape[0], MARKOV_TREE.max_depth
    out = torch.full((batch, 3), -1, dtype=torch.long)
    count = torch.zeros(batch, dtype=torch.long)
    first_step = None
    for _ in range(3):  # every step emits at least one token
        tokens = draft_tree(MARKOV_TREE, draft, prev, root)
        logits = tree_logits(MARKOV_TREE, base, prev, tokens)
        uniforms = torch.rand(batch, depth + 1, generator=gen, dtype=torch.float64)
        result = sample(MARKOV_TREE, tokens, logits, torch.full((batch,), temperature), uniforms)
        first_step = result.num_emitted if first_step is None else first_step
        for j in range(depth + 1):
            write = (j < result.num_emitted) & (count + j < 3)
            out[write, (count + j)[write]] = result.tokens[write, j]
        history = torch.cat([prev[:, None], root[:, None], result.tokens], dim=1)  # emitted from column 2
        prev = history.gather(1, result.num_emitted[:, None]).squeeze(1)
        root = history.gather(1, result.num_emitted[:, None] + 1).squeeze(1)
        count += result.num_emitted
    return out, first_step


def joint_p_value(sample: Sampler, temperature: float, trials: int = 40000) -> tuple[float, torch.Tensor]:
    """Chi-square p-value of the first 3 tokens after context (0, 1) against the base model's joint
    distribution p(y1 | 0, 1) p(y2 | 1, y1) p(y3 | y1, y2), cells with expected count < 5 pooled."""
    start = torch.zeros(trials, dtype=torch.long)
    drawn, first_step = first_tokens(sample, start, start + 1, temperature)
    base = torch.softmax(markov_tables(0)[0].log() / temperature, dim=-1)
    y1, y2, y3 = torch.meshgrid(*[torch.arange(VOCAB)] * 3, indexing="ij")
    expected = (base[0, 1, y1] * base[1, y1, y2] * base[y1, y2, y3]).flatten() * trials
    observed = torch.bincount(drawn @ torch.tensor([VOCAB**2, VOCAB, 1]), minlength=VOCAB**3).double()
    small = expected < 5
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum(0, keepdim=True)])
        expected = torch.cat([expected[~small], expected[small].sum(0, keepdim=True)])
    return float(chisquare(observed.numpy(), expected.numpy()).pvalue), first_step


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_lossless_first_tokens_follow_the_base_distribution(temperature):
    p_value, first_step = joint_p_value(accept_lossless, temperature)
    assert p_value > 1e-3
    assert float((first_step >= 3).double().mean()) > 0.25, "the harness must exercise acceptance at depth >= 2"


def first_child_biased(tree, tokens, logits, temperature, uniforms) -> Acceptance:
    """A wrong sampler: like accept_lossless, but takes a node's first child whenever its token has p > 0.1."""
    batch = tokens.shape[0]
    rows = torch.arange(batch)
    current = torch.zeros(batch, dtype=torch.long)
    alive = torch.ones(batch, dtype=torch.bool)
    out = torch.full((batch, tree.max_depth + 1), -1, dtype=torch.long)
    for d in range(tree.max_depth + 1):
        probs = torch.softmax(logits[rows, current] / temperature[:, None], dim=-1)
        kids = tree.children[current]
        kid_tokens = torch.where(kids >= 0, tokens.gather(1, kids.clamp(min=0)), -1)
        first = kid_tokens[:, 0]
        take_first = (first >= 0) & (probs.gather(1, first.clamp(min=0)[:, None]).squeeze(1) > 0.1)
        drawn = torch.where(take_first, first, sample_from_probs(probs, uniforms[:, d]))
        out[:, d] = torch.where(alive, drawn, -1)
        hit = kid_tokens == drawn[:, None]
        current = torch.where(alive & hit.any(-1), kids.gather(1, hit.int().argmax(-1, keepdim=True)).squeeze(1), 0)
        alive = alive & hit.any(-1)
    return Acceptance(out, (out >= 0).sum(-1), torch.full_like(out, -1))


def reused_uniform(tree, tokens, logits, temperature, uniforms) -> Acceptance:
    """A wrong sampler: one uniform for every depth (a seeded generator reused); each draw is right on its
    own, the joint is not."""
    return accept_lossless(tree, tokens, logits, temperature, uniforms[:, :1].expand_as(uniforms))


BIASED_SAMPLERS = {
    "first-child": first_child_biased,
    "reused-uniform": reused_uniform,
    # Typical acceptance is lossy by design.
    "typical": lambda tree, tokens, logits, t, u: accept_typical(tree, tokens, logits, t, uniforms=u[:, 0]),
}


@pytest.mark.parametrize("name", BIASED_SAMPLERS)
def test_the_same_harness_rejects_biased_samplers(name):
    p_value, _ = joint_p_value(BIASED_SAMPLERS[name], 1.0)
    assert p_value < 1e-6


def test_greedy_equals_plain_greedy_decoding():
    prev, root = (x.flatten() for x in torch.meshgrid(torch.arange(VOCAB), torch.arange(VOCAB), indexing="ij"))
    drawn, _ = first_tokens(lambda tree, tokens, logits, t, u: accept_greedy(tree, tokens, logits), prev, root, 1.0)
    base = markov_tables(0)[0]
    for b in range(VOCAB * VOCAB):
        context = [int(prev[b]), int(root[b])]
        for _ in range(3):
            context.append(int(base[context[-2], context[-1]].argmax()))
        assert drawn[b].tolist() == context[2:]


# --- input checks -----------------------------------------------------------------------------------------


def test_bad_shapes_raise_clear_errors():
    tree = TreeSpec.from_choices([[0], [1]])
    tokens, logits = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match=r"tokens must be \[batch, 3\] for a 2-node tree"):
        accept_greedy(tree, tokens[:, :2], logits)
    with pytest.raises(ValueError, match=r"logits must be \[2, 3, vocab\]"):
        accept_greedy(tree, tokens, logits[:1])
    with pytest.raises(ValueError, match=r"target must have the shape of tokens \[2, 3\]"):
        accept_greedy_targets(tree, tokens, tokens[:, :2])
    with pytest.raises(ValueError, match=r"uniforms must be \[2, 2\]"):
        accept_lossless(tree, tokens, logits, torch.ones(2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"scalars or \[2\]"):
        accept_typical(tree, tokens, logits, torch.ones(2), eps=torch.ones(3), uniforms=torch.zeros(2))


def test_empty_batch():
    tree = TreeSpec.preset(8)
    tokens, logits = torch.zeros(0, 9, dtype=torch.long), torch.zeros(0, 9, 5)
    results = [
        accept_greedy(tree, tokens, logits),
        accept_typical(tree, tokens, logits, torch.ones(0), uniforms=torch.zeros(0)),
        accept_lossless(tree, tokens, logits, torch.ones(0), torch.zeros(0, tree.max_depth + 1)),
    ]
    assert all(r.tokens.shape == r.path.shape == (0, tree.max_depth + 1) for r in results)
