"""Greedy tree Medusa inside vLLM equals plain vLLM token for token (CPU, float32, SmolLM2).

The oracle proposer (tests/vllm/oracle.py) hides the true continuation on non-first branches, so
deep paths are accepted (tau >= 2) through the real verification, KV compaction and proposal code.
"""

from __future__ import annotations

import pytest
from conftest import (
    BASE_ENGINE_ARGS, ORACLE, make_prompts, reset_tree_stats, shutdown, tree_stats, write_oracle,
)

pytestmark = pytest.mark.vllm

NUM_PROMPTS = 32
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def prompts(smollm2_f32):
    shared = "Here is a long shared preamble for a prefix-cache hit. " * 30  # > one 128-token block
    return make_prompts(smollm2_f32, NUM_PROMPTS) + [shared + "Say hello.", shared + "Say goodbye."]


@pytest.fixture(scope="module")
def reference(smollm2_f32, prompts, tmp_path_factory, monkeypatch_module):
    """Plain vLLM's greedy outputs, and an oracle file built from them."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(smollm2_f32), **BASE_ENGINE_ARGS)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    shutdown(llm)
    oracle_file = tmp_path_factory.mktemp("oracle") / "oracle.json"
    write_oracle(oracle_file, outputs)
    monkeypatch_module.setenv("MEDUSA_ORACLE_FILE", str(oracle_file))
    return outputs


@pytest.fixture(scope="module")
def medusa(smollm2_f32, oracle_heads, reference):
    from vllm import LLM

    llm = LLM(
        model=str(smollm2_f32),
        speculative_config={"method": "medusa", "model": str(oracle_heads)},
        additional_config={"medusa": {"proposer": ORACLE, "adaptive": False}},
        enable_prefix_caching=True,
        **BASE_ENGINE_ARGS,
    )
    yield llm
    shutdown(llm)


def _tokens(outputs) -> list[list[int]]:
    return [list(c.token_ids) for o in outputs for c in o.outputs]


def _greedy(max_tokens=MAX_TOKENS, **kwargs):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)


def test_greedy_equals_plain_vllm_with_deep_acceptance(medusa, prompts, reference):
    reset_tree_stats(medusa)
    outputs = medusa.generate(prompts, _greedy())
    assert _tokens(outputs) == _tokens(reference)
    stats = tree_stats(medusa)
    assert stats["fallback_steps"] == 0
    assert stats["tau"] >= 2.0, stats
    assert stats["accepted_per_depth"][1] > 0  # paths reached depth >= 2
    assert stats["kv_moves"] > 0  # accepted nodes were not all in slot order


def test_prefix_cache_hit_keeps_output(medusa, prompts, reference):
    metrics_before = _counter(medusa, "vllm:prefix_cache_hits")
    outputs = medusa.generate(prompts[-2:], _greedy())
    assert _tokens(outputs) == _tokens(reference[-2:])
    assert _counter(medusa, "vllm:prefix_cache_hits") > metrics_before


@pytest.mark.parametrize("part", ["depth_positions", "tree_mask", "kv_move"])
def test_mutation_breaks_exactness(medusa, prompts, reference, part):
    """Each of the tree fix-ups is needed: switching one off changes the output."""
    from vllm_medusa.vllm.attention import TREE_MODE

    TREE_MODE.disabled_parts.add(part)
    try:
        outputs = medusa.generate(prompts[:12], _greedy())
    finally:
        TREE_MODE.disabled_parts.discard(part)
    assert _tokens(outputs) != _tokens(reference[:12])


def test_max_tokens_inside_accepted_path(medusa, prompts, reference):
    reset_tree_stats(medusa)
    max_tokens = 7  # 1 token from prefill, then paths of up to 5 tokens: 1 + 5 + 5 overshoots 7
    outputs = medusa.generate(prompts[:8], _greedy(max_tokens))
    expected = [t[:max_tokens] for t in _tokens(reference[:8])]
    assert _tokens(outputs) == expected
    stats = tree_stats(medusa)
    emitted_after_prefill = sum(len(t) for t in expected) - len(expected)
    assert stats["emitted"] > emitted_after_prefill  # the scheduler cut accepted paths short


def test_stop_string_inside_accepted_path(medusa, prompts, reference):
    from vllm import SamplingParams

    ref = reference[3].outputs[0]
    text = ref.text
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    assert stop.strip(), "reference text too short for a stop string"
    out = medusa.generate([prompts[3]], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=[stop]))[0]
    assert out.outputs[0].text == text[: text.index(stop)]
    assert out.outputs[0].stop_reason == stop


def test_eos_inside_accepted_path(medusa, prompts, reference):
    """Requests whose reference ended with EOS end with it under Medusa too, nothing after it."""
    ended = [i for i, o in enumerate(reference) if o.outputs[0].finish_reason == "stop"]
    assert ended, "no reference output ended with EOS; pick longer max_tokens"
    outputs = medusa.generate([prompts[i] for i in ended], _greedy())
    for i, out in zip(ended, outputs):
        assert list(out.outputs[0].token_ids) == list(reference[i].outputs[0].token_ids)
        assert out.outputs[0].finish_reason == "stop"


def test_greedy_parallel_copies_of_a_prompt(medusa, prompts, reference):
    """vLLM 0.32 refuses greedy n > 1 ("n must be 1 when using greedy sampling"); the same prompt
    submitted several times in one batch is the greedy equivalent."""
    outputs = medusa.generate(prompts[:4] * 3, _greedy())
    assert _tokens(outputs) == _tokens(reference[:4]) * 3


def test_attention_calls_do_not_grow_with_requests(medusa, prompts):
    from vllm_medusa.vllm.attention import TREE_MODE

    calls = []
    for batch in (2, 16):
        TREE_MODE.attention_calls = 0
        reset_tree_stats(medusa)
        medusa.generate(prompts[:batch], _greedy(8))
        stats = tree_stats(medusa)
        calls.append(TREE_MODE.attention_calls / max(stats["steps"], 1))
    # per verification step: one call per layer and group (<= 2 groups), whatever the batch
    assert calls[1] <= calls[0] * 1.5


def test_exact_while_the_tree_changes_every_step(medusa, prompts, reference):
    """Adaptive speculation changes the tree between steps (down to no tree): output must not change."""
    def cycle_trees(worker):
        tree_step = worker.model_runner._medusa
        full = tree_step.settings.tree
        family = [full, full.truncated(3), None, full.truncated(7), full.truncated(1)]
        counter = iter(range(10**9))
        tree_step.schedule.choose = lambda rules, other_tokens=0: family[next(counter) % len(family)]

    def restore(worker):
        del worker.model_runner._medusa.schedule.choose  # back to the class method

    medusa.collective_rpc(cycle_trees)
    reset_tree_stats(medusa)
    try:
        outputs = medusa.generate(prompts[:NUM_PROMPTS], _greedy())
    finally:
        medusa.collective_rpc(restore)
    assert _tokens(outputs) == _tokens(reference[:NUM_PROMPTS])
    assert tree_stats(medusa)["trees"] > 0


def test_plain_engine_in_the_same_process_stays_plain(medusa, smollm2_f32, prompts, reference):
    """With VLLM_ENABLE_V1_MULTIPROCESSING=0 both engines share the process-wide tree mode: a plain engine
    created next to a tree engine must neither take the tree path nor disturb the tree engine's KV moves."""
    from vllm import LLM

    plain = LLM(model=str(smollm2_f32), **BASE_ENGINE_ARGS)
    for _ in range(2):  # interleaved, each engine's steps after the other's
        assert _tokens(medusa.generate(prompts[:6], _greedy())) == _tokens(reference[:6])
        assert _tokens(plain.generate(prompts[:6], _greedy())) == _tokens(reference[:6])
    # Not shut down here: vLLM's shutdown of an in-process engine tears down the process-wide parallel groups
    # the Medusa engine still uses. This test is the last to use `medusa`: the tests after it start tree
    # engines of their own, and two tree engines in one process are not supported.


@pytest.mark.parametrize(
    "engine_args, event",
    [
        (dict(num_gpu_blocks_override=10, max_model_len=1024, enable_prefix_caching=False), "vllm:num_preemptions"),
        (dict(max_num_batched_tokens=96, enable_chunked_prefill=True), None),
    ],
    ids=["preemption", "chunked_prefill"],
)
def test_exact_under_pressure(smollm2_f32, oracle_heads, prompts, reference, engine_args, event):
    args = {**BASE_ENGINE_ARGS, **engine_args}
    llm = _oracle_engine(smollm2_f32, oracle_heads, **args)
    try:
        outputs = llm.generate(prompts[:NUM_PROMPTS], _greedy())
        assert _tokens(outputs) == _tokens(reference[:NUM_PROMPTS])
        stats = tree_stats(llm)
        assert stats["tau"] >= 2.0 and stats["fallback_steps"] == 0
        if event:
            assert _counter(llm, event) > 0, f"{event} did not happen"
        else:  # prompts longer than the token budget were prefilled in chunks
            assert max(len(o.prompt_token_ids) for o in reference[:NUM_PROMPTS]) > args["max_num_batched_tokens"]
    finally:
        shutdown(llm)


def test_exact_at_the_context_limit(smollm2_f32, oracle_heads, prompts, reference):
    """Requests that reach max_model_len mid-generation: vLLM schedules only the first nodes that fit
    (a prefix of the tree, still prefix-closed), and the output is plain vLLM's cut at the limit."""
    prompt_lengths = [len(o.prompt_token_ids) for o in reference[:NUM_PROMPTS]]
    max_model_len = max(prompt_lengths) + MAX_TOKENS // 2
    llm = _oracle_engine(smollm2_f32, oracle_heads, **{**BASE_ENGINE_ARGS, "max_model_len": max_model_len})
    try:
        outputs = llm.generate(prompts[:NUM_PROMPTS], _greedy())
        stats = tree_stats(llm)
    finally:
        shutdown(llm)
    expected = [t[: max_model_len - n] for t, n in zip(_tokens(reference[:NUM_PROMPTS]), prompt_lengths)]
    assert _tokens(outputs) == expected
    full = _tokens(reference[:NUM_PROMPTS])
    capped = [o.outputs[0].finish_reason for o, t, f in zip(outputs, expected, full) if len(t) < len(f)]
    assert capped and set(capped) == {"length"}
    assert stats["cut_trees"] > 0 and stats["tau"] >= 2.0, str(stats)


def _oracle_engine(model, heads, **engine_args):
    from vllm import LLM

    return LLM(
        model=str(model),
        speculative_config={"method": "medusa", "model": str(heads)},
        additional_config={"medusa": {"proposer": ORACLE, "adaptive": False}},
        **engine_args,
    )


def _counter(llm, name: str) -> float:
    return sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == name)
