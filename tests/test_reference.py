"""Reference Medusa generator on the real SmolLM2-135M-Instruct (float32): greedy output must equal Hugging Face
greedy `generate` token for token, whatever the heads propose; stopping must be exact inside accepted paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from vllm_medusa.mtbench import load_mtbench
from vllm_medusa.reference import GenerationResult, MedusaGenerator, StaticDecode, plain_generate
from vllm_medusa.tree import TreeSpec

NEW_TOKENS = 32
NUM_HEADS, TOP_K = 4, 10


@pytest.fixture(scope="module")
def lm(smollm2_f32: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)  # two cores shared by everyone
    model = AutoModelForCausalLM.from_pretrained(smollm2_f32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_f32)


@pytest.fixture(scope="module")
def prompts(lm) -> list[list[int]]:
    """Chat-formatted first turns of two MT-Bench questions (a writing and a coding one)."""
    _, tokenizer = lm
    questions = load_mtbench(categories=["writing"], limit=1) + load_mtbench(categories=["coding"], limit=1)
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q.turns[0]}], add_generation_prompt=True)[
            "input_ids"
        ]
        for q in questions
    ]


@pytest.fixture(scope="module")
def references(lm, prompts) -> list[list[int]]:
    """Hugging Face greedy continuations, a few tokens longer than the tests ask for (the oracle peeks ahead)."""
    model, tokenizer = lm
    with torch.inference_mode():
        outputs = [
            model.generate(
                torch.tensor([ids]), max_new_tokens=NEW_TOKENS + NUM_HEADS + 1, do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
            )[0, len(ids):].tolist()
            for ids in prompts
        ]
    assert all(len(out) > NEW_TOKENS for out in outputs), "test prompts should not end before NEW_TOKENS"
    return outputs


class Oracle:
    """A proposer that knows the greedy continuation and puts its tokens at the given rank of each depth's top-k
    (other ranks get tokens that are surely wrong), so the accepted path is exactly that rank path."""

    def __init__(self, reference: list[int], ranks: tuple[int, ...], vocab_size: int) -> None:
        self.reference, self.ranks, self.vocab_size = reference, ranks, vocab_size

    def __call__(self, hidden: Tensor, emitted: list[int]) -> Tensor:
        on_track = emitted == self.reference[: len(emitted)]
        topk = torch.empty(1, NUM_HEADS, TOP_K, dtype=torch.long)
        for depth in range(1, NUM_HEADS + 1):
            index = len(emitted) - 1 + depth  # the root is reference[len(emitted) - 1]
            true = self.reference[index] if on_track and index < len(self.reference) else 0
            topk[0, depth - 1] = (true + 1 + torch.arange(TOP_K)) % self.vocab_size
            if depth <= len(self.ranks):
                topk[0, depth - 1, self.ranks[depth - 1]] = true
        return topk


def _oracle_generator(lm, reference: list[int], tree_size: int, ranks: tuple[int, ...]) -> MedusaGenerator:
    model, _ = lm
    tree = TreeSpec.preset(tree_size)
    assert ranks in tree.choices, "the oracle's path must be in the tree"
    return MedusaGenerator(model, None, tree, proposer=Oracle(reference, ranks, model.config.vocab_size))


def test_plain_generate_matches_hf(lm, prompts, references) -> None:
    _, tokenizer = lm
    for ids, reference in zip(prompts, references):
        result = plain_generate(lm[0], ids, NEW_TOKENS, eos_token_id=tokenizer.eos_token_id)
        assert result == GenerationResult(reference[:NEW_TOKENS], NEW_TOKENS - 1, 1.0, [])


def test_static_decode_batch_of_mixed_lengths_matches_hf(lm, prompts, references) -> None:
    """Left-padded rows of different lengths, decoded together, each equal their own greedy continuation."""
    model, tokenizer = lm
    rows = [prompts[0], prompts[1], prompts[0][: len(prompts[0]) // 2]]
    with torch.inference_mode():
        short = model.generate(torch.tensor([rows[2]]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(rows[2]):]
    expected = [references[0][:NEW_TOKENS], references[1][:NEW_TOKENS], short.tolist()]  # short may end at EOS
    width = max(map(len, rows))
    padding = torch.tensor([width - len(r) for r in rows])
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    with torch.inference_mode():
        step = StaticDecode(model, input_ids, NEW_TOKENS, padding=padding)
        tokens = [step.logits.argmax(-1)]
        for _ in range(NEW_TOKENS - 1):
            tokens.append(step(tokens[-1]).argmax(-1))
        decoded = torch.stack(tokens, 1).tolist()
        assert [row[: len(want)] for row, want in zip(decoded, expected)] == expected
        with pytest.raises(ValueError, match="full"):
            step(tokens[-1]), step(tokens[-1])


# Accepted paths that are not the tree's first branch, so cache compaction must gather scattered positions.
@pytest.mark.parametrize(("tree_size", "ranks"), [(64, (0, 0, 0, 1)), (32, (1, 0, 0)), (16, (0, 1))])
def test_oracle_greedy_matches_hf(lm, prompts, references, tree_size: int, ranks: tuple[int, ...]) -> None:
    for ids, reference in zip(prompts, references):
        result = _oracle_generator(lm, reference, tree_size, ranks).generate(
            ids, NEW_TOKENS, eos_token_id=lm[1].eos_token_id
        )
        assert result.tokens == reference[:NEW_TOKENS]
        # Every step accepts the whole oracle path (the last step's may run past the references' end).
        assert result.tau >= len(ranks) + 0.5 and result.accepted_per_depth[len(ranks) - 1] == result.steps


def test_random_heads_greedy_matches_hf(lm, prompts, references) -> None:
    heads_module = pytest.importorskip("vllm_medusa.heads")
    model, tokenizer = lm
    torch.manual_seed(0)
    # A random 2048-token vocabulary keeps the random heads small and exercises token_map.
    token_map = torch.randperm(model.config.vocab_size)[:2048].sort().values
    heads = heads_module.MedusaHeads(model.config.hidden_size, model.config.vocab_size, NUM_HEADS, token_map=token_map)
    tree = TreeSpec.preset(4)
    generator = MedusaGenerator(model, heads, tree)
    for ids, reference in zip(prompts, references):
        result = generator.generate(ids, NEW_TOKENS, eos_token_id=tokenizer.eos_token_id)
        assert result.tokens == reference[:NEW_TOKENS]
        assert result.steps >= 1 and 1.0 <= result.tau <= 1 + tree.max_depth


def test_max_new_tokens_inside_an_accepted_path(lm, prompts, references) -> None:
    # Prefill emits 1 token, each step 5: the second step overshoots 8 and must be cut.
    result = _oracle_generator(lm, references[0], 64, (0, 0, 0, 1)).generate(prompts[0], 8)
    assert result == GenerationResult(references[0][:8], 2, 5.0, [2, 2, 2, 2])


def test_eos_inside_an_accepted_path(lm, prompts, references) -> None:
    reference = references[0]
    # The first step emits reference[1:6]; stop on a token in its middle that did not occur before.
    stop_at = next(i for i in range(2, 5) if reference[i] not in reference[:i])
    result = _oracle_generator(lm, reference, 64, (0, 0, 0, 1)).generate(
        prompts[0], NEW_TOKENS, eos_token_id=[reference[stop_at], -5]
    )
    assert result.tokens == reference[: stop_at + 1] and result.steps == 1
    plain = plain_generate(lm[0], prompts[0], NEW_TOKENS, eos_token_id=reference[stop_at])
    assert plain.tokens == result.tokens


@pytest.mark.parametrize("mode", ["typical", "lossless"])
def test_sampling_modes_at_tiny_temperature_are_greedy(lm, prompts, references, mode: str) -> None:
    result = _oracle_generator(lm, references[0], 16, (0, 1)).generate(
        prompts[0], 16, mode=mode, temperature=1e-6
    )
    assert result.tokens == references[0][:16] and result.tau == 3.0


@pytest.mark.parametrize("mode", ["typical", "lossless"])
def test_sampling_is_reproducible_per_seed(lm, prompts, references, mode: str) -> None:
    generator = _oracle_generator(lm, references[0], 4, (0, 1))
    runs = [generator.generate(prompts[0], 8, mode=mode, temperature=1.0, seed=seed) for seed in (7, 7, 8)]
    assert runs[0] == runs[1] and len(runs[0].tokens) == 8
    assert runs[0].tokens != runs[2].tokens  # at temperature 1 two seeds agreeing on 8 tokens is implausible


def test_bad_requests_raise(lm, prompts) -> None:
    model, _ = lm
    tree = TreeSpec.preset(4)
    with pytest.raises(ValueError, match="needs heads or a proposer"):
        MedusaGenerator(model, None, tree)
    generator = MedusaGenerator(model, None, tree, proposer=lambda hidden, emitted: torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="mode must be one of"):
        generator.generate(prompts[0], 4, mode="beam")
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generator.generate(prompts[0], 0)
    with pytest.raises(ValueError, match="input_ids is empty"):
        plain_generate(model, [], 4)
    with pytest.raises(ValueError, match="cuda_graph=True needs a model on a CUDA device"):
        plain_generate(model, prompts[0], 4, cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_medusa_equals_eager_and_plain() -> None:
    """The captured step (propose, verify, accept, move KV) gives the eager step's tokens and steps, and plain
    greedy decoding's tokens. Heads start as the LM head (each proposes the root's successor again), and a
    small random model repeats itself soon, so paths of depth >= 1 get accepted and the KV move is exercised."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vllm_medusa.heads import MedusaHeads

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(config).cuda().eval()
    heads = MedusaHeads(64, 64, 4).cuda().eval()
    heads.init_from_lm_head(model.lm_head.weight.detach())
    tree = TreeSpec.preset(16)
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (5, 37, 100)]
    for ids in prompts:
        plain = plain_generate(model, ids, 96)
        eager = MedusaGenerator(model, heads, tree, cuda_graph=False).generate(ids, 96)
        graphed = MedusaGenerator(model, heads, tree, cuda_graph=True).generate(ids, 96)
        assert graphed == eager
        assert graphed.tokens == plain.tokens
    assert graphed.tau > 1.2, "no path was accepted: the KV move went untested"
