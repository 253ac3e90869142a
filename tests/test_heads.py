import json

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from heads_fixtures import H, K, TOKEN_MAP, V, VARIANTS, random_heads

from vllm_medusa.heads import HeadsConfig, MedusaHeads, ResidualBlock


def per_head_logits(heads: MedusaHeads, hidden: torch.Tensor) -> torch.Tensor:
    """The Medusa formula, one head at a time: hidden [N, H] -> [K, N, V']."""
    logits = []
    for k in range(heads.num_heads):
        x = hidden
        for block in heads.blocks:
            bias = 0.0 if block.bias is None else block.bias[k]
            x = x + F.silu(x @ block.weight[k].T + bias)
        lm = heads.lm_head if heads.shared_lm_head else heads.lm_head[k]
        logits.append(heads.logit_scale * (x @ lm.T))
    return torch.stack(logits)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_per_head_formula(variant):
    heads = random_heads(**VARIANTS[variant])
    hidden = torch.randn(2, 5, H)
    logits = heads(hidden)
    assert logits.shape == (K, 2, 5, heads.truncated_vocab_size)
    expected = per_head_logits(heads, hidden.reshape(10, H)).reshape(logits.shape)
    torch.testing.assert_close(logits, expected)


def test_fresh_residual_block_is_identity():
    block = ResidualBlock(K, H)
    x = torch.randn(K, 4, H)
    assert torch.equal(block(x), x)


@pytest.mark.parametrize("variant", VARIANTS)
def test_topk_tokens_matches_per_head_loop(variant):
    heads = random_heads(**VARIANTS[variant])
    hidden = torch.randn(6, H)
    tokens = heads.topk_tokens(hidden, 4)
    assert tokens.shape == (6, K, 4) and tokens.dtype == torch.int64
    reference = per_head_logits(heads, hidden)
    for b in range(6):
        for k in range(K):
            top = reference[k, b].topk(4).indices
            expected = top if heads.token_map is None else heads.token_map[top]
            assert tokens[b, k].tolist() == expected.tolist()


def test_topk_tokens_are_full_vocabulary_ids():
    heads = random_heads(token_map=TOKEN_MAP)
    tokens = heads.topk_tokens(torch.randn(5, H), 3)
    assert set(tokens.flatten().tolist()) <= set(TOKEN_MAP.tolist())


class _LogitMatmuls(TorchFunctionMode):
    """Counts matmul-like calls whose output has `columns` columns (the LM heads')."""

    MATMULS = {"bmm", "mm", "matmul", "__matmul__", "einsum", "linear"}

    def __init__(self, columns: int) -> None:
        super().__init__()
        self.columns, self.calls = columns, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", None) in self.MATMULS and out.shape[-1] == self.columns:
            self.calls += 1
        return out


@pytest.mark.parametrize("variant", ["per-head", "shared", "truncated"])
def test_topk_tokens_runs_all_lm_heads_in_one_matmul(variant):
    heads = random_heads(**VARIANTS[variant])
    hidden = torch.randn(8, H)
    with _LogitMatmuls(heads.truncated_vocab_size) as counter:
        heads.topk_tokens(hidden, 2)
    assert counter.calls == 1
    with _LogitMatmuls(heads.truncated_vocab_size) as loop_counter:  # the counter does see a loop over heads
        per_head_logits(heads, hidden)
    assert loop_counter.calls == K


def test_shared_lm_head_is_stored_once():
    heads = MedusaHeads(H, V, K, shared_lm_head=True, token_map=TOKEN_MAP)
    assert heads.lm_head.shape == (len(TOKEN_MAP), H)
    assert sum(p.numel() for p in heads.parameters()) == K * (H * H + H) + len(TOKEN_MAP) * H


@pytest.mark.parametrize("variant", ["per-head", "shared", "truncated", "shared-truncated"])
def test_init_from_lm_head_gives_the_base_logits(variant):
    heads = random_heads(num_layers=2, **VARIANTS[variant])
    base = torch.randn(V, H)
    heads.init_from_lm_head(base)
    hidden = torch.randn(5, H)
    expected = hidden @ base.T
    if heads.token_map is not None:
        expected = expected[:, heads.token_map]
    torch.testing.assert_close(heads(hidden), expected.expand(K, -1, -1))
    assert all(not block.weight.any() and not block.bias.any() for block in heads.blocks)


def test_gradients_reach_all_weights():
    heads = random_heads()
    heads(torch.randn(3, H)).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())


def test_init_from_lm_head_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\[V, H\] = \[100, 32\], got \[99, 32\]"):
        MedusaHeads(H, V, K).init_from_lm_head(torch.randn(V - 1, H))


@pytest.mark.parametrize(
    "token_map, message",
    [
        (torch.tensor([0, 5, V]), "must lie in"),
        (torch.tensor([[0, 1]]), "1-D integer"),
        (torch.tensor([0.0, 1.0]), "1-D integer"),
        (torch.tensor([3, 3]), "duplicate"),
        (torch.arange(V), "shorter than the vocabulary"),
    ],
)
def test_bad_token_map_is_rejected(token_map, message):
    with pytest.raises(ValueError, match=message):
        MedusaHeads(H, V, K, token_map=token_map)


def test_bad_topk_arguments_are_rejected():
    heads = MedusaHeads(H, V, K, token_map=TOKEN_MAP)
    with pytest.raises(ValueError, match=r"k must be in 1..40, got 41"):
        heads.topk_tokens(torch.randn(2, H), 41)
    with pytest.raises(ValueError, match="must be \\[B, H\\]"):
        heads.topk_tokens(torch.randn(2, 3, H), 1)
    with pytest.raises(ValueError, match="heads expect 32"):
        heads(torch.randn(2, H + 1))


def test_config_describes_the_heads():
    heads = MedusaHeads(H, V, K, num_layers=2, bias=False, shared_lm_head=True, token_map=TOKEN_MAP, logit_scale=2.0)
    assert heads.config == HeadsConfig(
        hidden_size=H,
        vocab_size=V,
        num_heads=K,
        num_layers=2,
        bias=False,
        shared_lm_head=True,
        truncated_vocab_size=40,
        logit_scale=2.0,
    )


def test_config_defaults():
    config = HeadsConfig(hidden_size=H, vocab_size=V, num_heads=K)
    assert (config.truncated_vocab_size, config.tree) == (V, None)
    assert (config.acceptance, config.typical_eps, config.typical_delta) == ("auto", 0.09, 0.3)


def test_config_json_round_trip_with_vllm_keys():
    config = HeadsConfig(
        hidden_size=H,
        vocab_size=V,
        num_heads=K,
        num_layers=2,
        shared_lm_head=True,
        truncated_vocab_size=40,
        tree=[(0,), (1,), (0, 0)],
        acceptance="typical",
        typical_eps=0.05,
        typical_delta=0.2,
    )
    text = config.to_vllm_json()
    assert HeadsConfig.from_json(text) == config
    stored = json.loads(text)
    assert stored["model_type"] == "medusa" and stored["architectures"] == ["MedusaModel"]
    assert (stored["num_heads"], stored["num_hidden_layers"], stored["truncated_vocab_size"]) == (K, 2, 40)
    assert stored["medusa_fc_bias"] is True and stored["original_lm_head"] is True
    assert config.tree == [[0], [1], [0, 0]]


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="acceptance must be one of"):
        HeadsConfig(hidden_size=H, vocab_size=V, num_heads=K, acceptance="fast")
    with pytest.raises(ValueError, match="typical_eps and typical_delta must be > 0"):
        HeadsConfig(hidden_size=H, vocab_size=V, num_heads=K, typical_eps=0.0)
    with pytest.raises(ValueError, match="lacks \\['vocab_size'\\]"):
        HeadsConfig.from_json(json.dumps({"hidden_size": H, "num_heads": K}))
