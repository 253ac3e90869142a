"""Sampled decoding (temperature > 0) through vLLM with tree Medusa: exact distribution, seeds, mixing.

The harness: many seeded requests of one prompt with max_tokens=3. Token 1 comes from the prefill step
(no tree); tokens 2 and 3 come from one verification step whenever the tree holds them (tree depths 1
and 2). The joint law of the three tokens is compared by chi-square with p(t1) p(t2|t1) p(t3|t1,t2)
computed independently with transformers (float32, same temperature and top-p), so acceptance at depth 2
is tested, not only the first draw. The proposer drafts the base model's own top-k (tests/vllm/base_topk.py)
so depth-2 acceptance is frequent (asserted from TreeStats), and the same harness must reject a lossy
rule (typical acceptance) and a rule that is wrong at depth 2 only.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import BASE_ENGINE_ARGS, reset_tree_stats, shutdown, tree_stats, write_config_heads

pytestmark = pytest.mark.vllm

PROMPT = "The capital of France is"  # " Paris" then a spread-out but peaked continuation
TEMPERATURE, TOP_P = 0.8, 0.9  # top-p < 1 checks that it applies after the temperature, as in vLLM
# Depth 2 is enough: with max_tokens=3 a path deeper than 2 only adds tokens that are cut off.
SAMPLING_TREE = [[0], [1], [2], [0, 0], [0, 1], [1, 0]]
NUM_EXACT, NUM_BIASED = 400, 150  # requests per chi-square run
MIN_EXPECTED = 5.0  # chi-square bins: triples expected at least this often, the rest in one bin
P_CORRECT, P_BIASED = 1e-3, 1e-6
GREEDY_PROMPTS = ["Once upon a time", "The weather today is", "My favourite colour is"]
MIX_TOKENS = 8
ENGINE_ARGS = {**BASE_ENGINE_ARGS, "max_num_seqs": 256, "max_model_len": 256}


@pytest.fixture(scope="module")
def tokenizer(smollm2_f32):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_f32)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[int]:
    return tokenizer(PROMPT).input_ids


@pytest.fixture(scope="module")
def greedy_reference(smollm2_f32, tokenizer) -> list[list[int]]:
    """Plain vLLM's greedy outputs for GREEDY_PROMPTS."""
    from vllm import LLM

    llm = LLM(model=str(smollm2_f32), **ENGINE_ARGS)
    outputs = llm.generate(_token_prompts(tokenizer, GREEDY_PROMPTS), _greedy(), use_tqdm=False)
    shutdown(llm)
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def law(smollm2_f32, tokenizer, prompt_ids, greedy_reference, tmp_path_factory, monkeypatch_module):
    """The exact law of the first three tokens, and the proposer's draft table (both from transformers)."""
    from base_topk import TOPK_ENV, draft_table
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_f32, dtype=torch.float32).eval()
    probs = triple_law(model, prompt_ids, MIN_EXPECTED / NUM_EXACT)
    # Histories the tree steps start from: the prompt + token 1 (+ token 2), and the greedy paths.
    histories = {(*prompt_ids, *t[:1]) for t in probs} | {(*prompt_ids, *t[:2]) for t in probs}
    for prompt, reference in zip(_token_ids(tokenizer, GREEDY_PROMPTS), greedy_reference):
        histories |= {(*prompt, *reference[:j]) for j in range(1, len(reference))}
    table = draft_table(model, [list(h) for h in sorted(histories)], num_heads=2, k=3)
    path = tmp_path_factory.mktemp("topk") / "topk.json"
    path.write_text(json.dumps({"drafts": table}))
    monkeypatch_module.setenv(TOPK_ENV, str(path))
    return probs


@pytest.fixture(scope="module")
def medusa(smollm2_f32, law, tmp_path_factory):
    from vllm import LLM

    heads = write_config_heads(tmp_path_factory.mktemp("sampling_heads"), SAMPLING_TREE)
    proposer = str(Path(__file__).with_name("base_topk.py")) + ":make_proposer"
    llm = LLM(
        model=str(smollm2_f32),
        speculative_config={"method": "medusa", "model": str(heads)},
        additional_config={"medusa": {"proposer": proposer, "adaptive": False}},
        **ENGINE_ARGS,
    )
    yield llm
    shutdown(llm)


# -- exact law and chi-square ---------------------------------------------------------------------------
def sampling_probs(model, sequences: list[list[int]]) -> torch.Tensor:
    """[B, V] float64 next-token law as vLLM samples it: temperature first, then top-p."""
    from base_topk import next_token_logits

    probs = torch.softmax(next_token_logits(model, sequences) / TEMPERATURE, dim=-1).double()
    ordered, order = probs.sort(dim=-1, descending=True)
    keep = (ordered.cumsum(dim=-1) - ordered) < TOP_P  # the smallest prefix reaching TOP_P
    probs = probs * torch.zeros_like(probs, dtype=torch.bool).scatter(1, order, keep)
    return probs / probs.sum(dim=-1, keepdim=True)


def triple_law(model, prompt: list[int], floor: float) -> dict[tuple[int, int, int], float]:
    """p(t1) p(t2|t1) p(t3|t1,t2) for every triple of probability >= floor."""
    p1 = sampling_probs(model, [prompt])[0]
    firsts = (p1 >= floor).nonzero().flatten().tolist()
    p2 = sampling_probs(model, [prompt + [a] for a in firsts])
    pairs = [
        (a, b, float(p1[a] * p2[i, b]))
        for i, a in enumerate(firsts)
        for b in (p1[a] * p2[i] >= floor).nonzero().flatten().tolist()
    ]
    p3 = sampling_probs(model, [prompt + [a, b] for a, b, _ in pairs])
    return {
        (a, b, c): p_ab * float(p3[j, c])
        for j, (a, b, p_ab) in enumerate(pairs)
        for c in (p_ab * p3[j] >= floor).nonzero().flatten().tolist()
    }


def chi_square(law: dict[tuple[int, ...], float], samples: list[tuple[int, ...]]) -> tuple[float, float, int]:
    """(statistic, p-value, bins): triples expected >= MIN_EXPECTED times each, plus one bin for the rest."""
    from scipy.stats import chisquare

    n = len(samples)
    bins = [t for t, p in law.items() if p * n >= MIN_EXPECTED]
    counts = Counter(samples)
    observed = [counts[b] for b in bins]
    expected = [law[b] * n for b in bins]
    observed.append(n - sum(observed))
    expected.append(n - sum(expected))
    result = chisquare(observed, expected)
    return float(result.statistic), float(result.pvalue), len(expected)


def sample_triples(llm, prompt_ids: list[int], n: int, first_seed: int, **extra) -> list[tuple[int, ...]]:
    from vllm import SamplingParams

    params = [
        SamplingParams(
            temperature=TEMPERATURE, top_p=TOP_P, max_tokens=3, ignore_eos=True, seed=first_seed + i, **extra
        )
        for i in range(n)
    ]
    outputs = llm.generate([{"prompt_token_ids": prompt_ids}] * n, params, use_tqdm=False)
    return [tuple(o.outputs[0].token_ids) for o in outputs]


# -- distribution ---------------------------------------------------------------------------------------
def test_lossless_sampling_keeps_the_base_distribution(medusa, prompt_ids, law):
    reset_tree_stats(medusa)
    samples = sample_triples(medusa, prompt_ids, NUM_EXACT, first_seed=0)
    statistic, p_value, bins = chi_square(law, samples)
    stats = tree_stats(medusa)
    print(f"lossless: chi2={statistic:.1f} bins={bins} p={p_value:.3g} stats={stats}")
    assert p_value > P_CORRECT
    assert stats["trees_by_rule"] == {"lossless": stats["trees"]}
    assert stats["accepted_per_depth"][1] >= NUM_EXACT // 5  # depth 2 accepted often


def test_typical_acceptance_on_request_is_used_counted_and_caught(medusa, prompt_ids, law):
    """Typical acceptance (lossy by design) per request: it runs, is counted, and the harness sees it."""
    extra_args = {"medusa_acceptance": "typical", "typical_eps": 0.3, "typical_delta": 0.5}
    reset_tree_stats(medusa)
    samples = sample_triples(medusa, prompt_ids, NUM_BIASED, first_seed=10_000, extra_args=extra_args)
    statistic, p_value, bins = chi_square(law, samples)
    stats = tree_stats(medusa)
    print(f"typical: chi2={statistic:.1f} bins={bins} p={p_value:.3g} stats={stats}")
    assert stats["trees_by_rule"] == {"typical": stats["trees"]} and stats["trees"] >= NUM_BIASED
    assert p_value < P_BIASED


def test_a_rule_wrong_only_at_depth_two_is_caught(medusa, prompt_ids, law, monkeypatch):
    """Mutation: after a depth-1 node, always emit its first child instead of the sampled token."""
    import vllm_medusa.vllm.tree_step as tree_step

    original = tree_step.accept_lossless

    def first_child_at_depth_two(tree, tokens, logits, temperature, uniforms):
        result = original(tree, tokens, logits, temperature, uniforms)
        node = result.path[:, 1]
        child = torch.where(node > 0, tree.children[node.clamp(min=0), 0], -1)
        forced = (child > 0).nonzero().flatten()
        result.tokens[forced, 1] = tokens[forced, child[forced]]
        return result

    monkeypatch.setattr(tree_step, "accept_lossless", first_child_at_depth_two)
    reset_tree_stats(medusa)
    samples = sample_triples(medusa, prompt_ids, NUM_BIASED, first_seed=20_000)
    statistic, p_value, bins = chi_square(law, samples)
    print(f"biased at depth 2: chi2={statistic:.1f} bins={bins} p={p_value:.3g}")
    assert tree_stats(medusa)["accepted_per_depth"][0] > 0
    assert p_value < P_BIASED


# -- seeds and mixing -----------------------------------------------------------------------------------
def test_seeded_requests_reproducible_across_runs_and_batch_mixes(medusa, tokenizer, prompt_ids):
    """A seeded request gives the same tokens alone, again in another batch, and when it starts while
    other requests (greedy, unseeded, typical, a vLLM-sampled logprobs request) are verifying trees
    whose shape changes every step (as adaptive speculation changes it with the batch)."""
    from vllm import SamplingParams

    greedy_prompts = _token_prompts(tokenizer, GREEDY_PROMPTS)
    seeded = [
        ({"prompt_token_ids": prompt_ids}, SamplingParams(temperature=1.0, max_tokens=MIX_TOKENS, seed=7)),
        (greedy_prompts[0], SamplingParams(temperature=0.7, top_k=20, max_tokens=MIX_TOKENS, seed=8)),
        (greedy_prompts[1], SamplingParams(temperature=1.0, max_tokens=MIX_TOKENS, seed=9, logprobs=1)),
    ]
    others = [
        (greedy_prompts[2], _greedy()),
        ({"prompt_token_ids": prompt_ids}, SamplingParams(temperature=1.0, max_tokens=MIX_TOKENS)),
        (greedy_prompts[0], SamplingParams(temperature=0.9, max_tokens=MIX_TOKENS, seed=5)),
        (greedy_prompts[1], SamplingParams(temperature=0.8, max_tokens=MIX_TOKENS,
                                           extra_args={"medusa_acceptance": "typical"})),
        (greedy_prompts[2], SamplingParams(temperature=1.0, max_tokens=MIX_TOKENS, seed=6, logprobs=2)),
    ]
    alone = [_tokens(medusa.generate([p], params, use_tqdm=False))[0] for p, params in seeded]
    again = _tokens(medusa.generate([p for p, _ in seeded], [params for _, params in seeded], use_tqdm=False))
    reset_tree_stats(medusa)
    with trees_changing_every_step(medusa):
        mixed = run_staggered(medusa, early=others, late=seeded, steps_between=2)
    assert again == alone
    assert mixed[len(others):] == alone
    assert tree_stats(medusa)["trees"] > 0


def test_greedy_requests_equal_plain_vllm_among_sampled_ones(medusa, tokenizer, prompt_ids, greedy_reference):
    from vllm import SamplingParams

    greedy_prompts = _token_prompts(tokenizer, GREEDY_PROMPTS)
    sampled = [
        SamplingParams(temperature=0.8, top_p=0.9, max_tokens=16, seed=1),
        SamplingParams(temperature=1.0, top_k=20, max_tokens=16),
        SamplingParams(temperature=0.8, max_tokens=16, extra_args={"medusa_acceptance": "typical"}),
    ]
    prompts, params = [], []
    for greedy_prompt, sampled_params in zip(greedy_prompts, sampled):
        prompts += [greedy_prompt, {"prompt_token_ids": prompt_ids}]
        params += [_greedy(), sampled_params]
    reset_tree_stats(medusa)
    outputs = _tokens(medusa.generate(prompts, params, use_tqdm=False))
    assert outputs[0::2] == greedy_reference
    stats = tree_stats(medusa)
    assert set(stats["trees_by_rule"]) == {"greedy", "lossless", "typical"}
    assert stats["accepted_per_depth"][1] > 0


# -- helpers --------------------------------------------------------------------------------------------
@contextmanager
def trees_changing_every_step(llm) -> Iterator[None]:
    """The tree step drafts with a different tree (or none) at each step."""

    def cycle(worker) -> None:
        tree_step = worker.model_runner._medusa
        full = tree_step.settings.tree
        family = [full.truncated(2), None, full, full.truncated(4)]
        counter = itertools.count()
        tree_step.schedule.choose = lambda rules, other_tokens=0: family[next(counter) % len(family)]

    def restore(worker) -> None:
        del worker.model_runner._medusa.schedule.choose  # back to the class method

    llm.collective_rpc(cycle)
    try:
        yield
    finally:
        llm.collective_rpc(restore)


def run_staggered(llm, early: list, late: list, steps_between: int) -> list[list[int]]:
    """Token ids of early + late requests, the late ones added after `steps_between` engine steps."""
    engine = llm.llm_engine
    finished: dict[str, list[int]] = {}

    def step() -> None:
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = list(output.outputs[0].token_ids)

    names = [f"early-{i}" for i in range(len(early))] + [f"late-{i}" for i in range(len(late))]
    for name, (prompt, params) in zip(names, early):
        engine.add_request(name, prompt, params)
    for _ in range(steps_between):
        step()
    for name, (prompt, params) in zip(names[len(early):], late):
        engine.add_request(name, prompt, params)
    while engine.has_unfinished_requests():
        step()
    return [finished[name] for name in names]


def _greedy(max_tokens: int = 16):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens)


def _token_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [tokenizer(p).input_ids for p in prompts]


def _token_prompts(tokenizer, prompts: list[str]) -> list[dict]:
    return [{"prompt_token_ids": ids} for ids in _token_ids(tokenizer, prompts)]


def _tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]
