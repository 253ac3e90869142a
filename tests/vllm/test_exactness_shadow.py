"""The shadow-KV fallback (vLLM CPU ISAs whose cache layout `native_kv` does not read, e.g. amx) keeps
greedy tree Medusa exact too; forced here by emptying `NATIVE_LAYOUT_ISAS` while the engine is built."""

from __future__ import annotations

import pytest
from conftest import BASE_ENGINE_ARGS, ORACLE, make_prompts, shutdown, tree_stats, write_oracle

pytestmark = pytest.mark.vllm

NUM_PROMPTS = 10
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def case(smollm2_f32, oracle_heads, tmp_path_factory, monkeypatch_module):
    """(prompts, plain vLLM's greedy tokens, a tree engine reading the shadow copy)."""
    from vllm import LLM, SamplingParams

    import vllm_medusa.vllm.attention as attention

    prompts = make_prompts(smollm2_f32, NUM_PROMPTS)
    plain = LLM(model=str(smollm2_f32), **BASE_ENGINE_ARGS)
    reference = plain.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    shutdown(plain)
    oracle_file = tmp_path_factory.mktemp("oracle") / "oracle.json"
    write_oracle(oracle_file, reference)
    monkeypatch_module.setenv("MEDUSA_ORACLE_FILE", str(oracle_file))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention, "NATIVE_LAYOUT_ISAS", frozenset())
        llm = LLM(
            model=str(smollm2_f32),
            speculative_config={"method": "medusa", "model": str(oracle_heads)},
            additional_config={"medusa": {"proposer": ORACLE, "adaptive": False}},
            **BASE_ENGINE_ARGS,
        )
    yield prompts, [list(o.outputs[0].token_ids) for o in reference], llm
    shutdown(llm)


def _greedy_tokens(llm, prompts):
    from vllm import SamplingParams

    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_greedy_equals_plain_vllm_reading_the_shadow(case):
    from vllm_medusa.vllm.attention import TREE_MODE

    prompts, reference, llm = case
    assert _greedy_tokens(llm, prompts) == reference
    assert not TREE_MODE.reads_native and TREE_MODE.shadow.cache is not None
    assert tree_stats(llm)["tau"] >= 2.0


def test_losing_held_shadow_writes_breaks_exactness(case):
    """Steps without trees hold their shadow writes until the next step: dropping them changes the output."""
    from vllm_medusa.vllm.attention import TREE_MODE

    prompts, reference, llm = case
    TREE_MODE.disabled_parts.add("held_shadow_writes")
    try:
        assert _greedy_tokens(llm, prompts) != reference
    finally:
        TREE_MODE.disabled_parts.discard("held_shadow_writes")
