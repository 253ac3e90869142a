"""Requests with options the tree path cannot honour decode plainly, exactly as plain vLLM, amid tree requests.

Penalties, logprobs, bad words, min_tokens and structured output assume one token per step (or a chain),
so such a request gets no drafts and vLLM's own sampler picks its token (TreeStats.fallback_steps counts
its decode steps). Mixed into one batch with greedy tree requests (shipped SmolLM2 heads), every request
must give what plain vLLM gives for the same batch: the fallback ones (with their logprob values) and
the tree ones, which still verify trees.
"""

from __future__ import annotations

import pytest
from conftest import BASE_ENGINE_ARGS, make_prompts, reset_tree_stats, shipped_heads_engine, shutdown, tree_stats

pytestmark = pytest.mark.vllm

MAX_TOKENS = 24
NUM_TREE_REQUESTS = 4
SHORT_ANSWER = "Answer with one word: what colour is the sky on a clear day?"
CAPITAL = "What is the capital of France?"
CHOICES = ["Paris", "London", "Rome"]


@pytest.fixture(scope="module")
def chat(smollm2_f32):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_f32)

    def render(text: str) -> str:
        message = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True)

    return render


@pytest.fixture(scope="module")
def plain(smollm2_f32, chat):
    """Plain vLLM: the batch (tree requests first, then one request per unsupported option) and its outputs."""
    from vllm import LLM

    llm = LLM(model=str(smollm2_f32), **BASE_ENGINE_ARGS)
    try:
        tree_prompts = make_prompts(smollm2_f32, NUM_TREE_REQUESTS)
        greedy = llm.generate(tree_prompts + [chat(SHORT_ANSWER)], _params(), use_tqdm=False)
        bad_word = llm.get_tokenizer().decode(greedy[1].outputs[0].token_ids[2]).strip()  # plain greedy emits it
        fallback = fallback_requests(chat, tree_prompts, bad_word)
        prompts = tree_prompts + [prompt for prompt, _ in fallback.values()]
        params = [_params()] * NUM_TREE_REQUESTS + [params for _, params in fallback.values()]
        outputs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        shutdown(llm)
    names = [f"tree-{i}" for i in range(NUM_TREE_REQUESTS)] + list(fallback)
    by_name = dict(zip(names, outputs))
    # Each option changed the output, so the comparison below shows it was applied, not ignored.
    assert _tokens(by_name["repetition_penalty"]) != _tokens(greedy[0])
    assert _tokens(by_name["bad_words"]) != _tokens(greedy[1])
    assert len(_tokens(by_name["min_tokens"])) == MAX_TOKENS > len(_tokens(greedy[NUM_TREE_REQUESTS]))
    assert by_name["structured_output"].outputs[0].text in CHOICES
    return prompts, params, by_name


def fallback_requests(chat, prompts: list[str], bad_word: str) -> dict[str, tuple[str, object]]:
    """name -> (prompt, params), one request per option the tree path leaves to vLLM's sampler."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    assert bad_word, "pick another position for the bad word"
    return {
        "repetition_penalty": (prompts[0], _params(repetition_penalty=1.3)),
        "logprobs": (prompts[2], _params(logprobs=2)),
        "bad_words": (prompts[1], _params(bad_words=[bad_word])),
        "min_tokens": (chat(SHORT_ANSWER), _params(min_tokens=MAX_TOKENS)),  # its greedy answer is shorter
        "structured_output": (chat(CAPITAL), _params(structured_outputs=StructuredOutputsParams(choice=CHOICES))),
        "seeded_sampling_logprobs": (prompts[3], SamplingParams(temperature=0.8, seed=3, logprobs=1,
                                                                max_tokens=MAX_TOKENS)),
    }


@pytest.fixture(scope="module")
def medusa(smollm2_f32, plain):  # after `plain`: shutting an engine down resets vLLM's process-wide groups
    llm = shipped_heads_engine(smollm2_f32, {"adaptive": False}, per_request_spec_decode_metrics="summary")
    yield llm
    shutdown(llm)


def test_unsupported_options_decode_as_plain_vllm_amid_tree_requests(medusa, plain):
    prompts, params, expected = plain
    reset_tree_stats(medusa)
    outputs = dict(zip(expected, medusa.generate(prompts, params, use_tqdm=False)))
    stats = tree_stats(medusa)
    print(f"TreeStats: {stats}")

    for name, output in outputs.items():
        assert _tokens(output) == _tokens(expected[name]), name
        drafted = output.outputs[0].spec_decode_metrics.to_dict()["num_spec_steps"]
        assert (drafted > 0) == name.startswith("tree-"), name  # fallback requests never get drafts
    for name in ("logprobs", "seeded_sampling_logprobs"):
        assert_same_logprobs(outputs[name], expected[name])
    fallback_tokens = sum(len(_tokens(o)) for name, o in outputs.items() if not name.startswith("tree-"))
    assert stats["fallback_steps"] == fallback_tokens - (len(outputs) - NUM_TREE_REQUESTS)  # decode steps
    assert stats["trees"] > 0 and stats["accepted_per_depth"][0] > 0  # the others still ran the tree


def assert_same_logprobs(output, expected) -> None:
    ours, theirs = output.outputs[0].logprobs, expected.outputs[0].logprobs
    assert ours is not None and len(ours) == len(theirs)
    for position, (mine, ref) in enumerate(zip(ours, theirs)):
        assert mine.keys() == ref.keys(), position
        for token, logprob in ref.items():
            assert mine[token].rank == logprob.rank, (position, token)
            assert mine[token].logprob == pytest.approx(logprob.logprob, abs=1e-3), (position, token)


def _params(**options):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, **options)


def _tokens(output) -> list[int]:
    return list(output.outputs[0].token_ids)
