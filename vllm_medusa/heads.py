"""Medusa decoding heads: K small heads on the base model's last hidden state.

Head k reads h (the base model's hidden state after the final norm) and predicts token t+k+1:

    x_0 = h,   x_{l+1} = x_l + SiLU(W_{k,l} x_l + b_{k,l}),   logits_k = logit_scale * U_k x_L

The weights of all heads are stacked along a leading head dimension, so each residual layer and the LM
heads are one batched matmul for all heads. Checkpoint layouts (one tensor per head) live in checkpoint.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACCEPTANCE_MODES = ("auto", "greedy", "typical", "lossless")
# config.json key holding our extras (tree, acceptance defaults); vLLM and the reference code ignore it.
EXTRAS_KEY = "vllm_medusa"
_EXTRA_FIELDS = ("tree", "acceptance", "typical_eps", "typical_delta")
# vLLM MedusaConfig key -> HeadsConfig field (vllm/transformers_utils/configs/medusa.py, models/medusa.py).
_VLLM_KEYS = {
    "hidden_size": "hidden_size",
    "vocab_size": "vocab_size",
    "num_heads": "num_heads",
    "num_hidden_layers": "num_layers",
    "medusa_fc_bias": "bias",
    "original_lm_head": "shared_lm_head",
    "truncated_vocab_size": "truncated_vocab_size",
    "logit_scale": "logit_scale",
}
_REQUIRED_KEYS = ("hidden_size", "vocab_size", "num_heads")


@dataclass
class HeadsConfig:
    """Shape of a set of heads plus the decoding defaults stored with them.

    truncated_vocab_size: V', the number of LM-head rows (None means no truncation, i.e. vocab_size).
    tree: rank paths of the default tree (list of lists), or None for the plugin's default.
    """

    hidden_size: int
    vocab_size: int
    num_heads: int
    num_layers: int = 1
    bias: bool = True
    shared_lm_head: bool = False
    truncated_vocab_size: Optional[int] = None
    logit_scale: float = 1.0
    tree: Optional[list[list[int]]] = None
    acceptance: str = "auto"
    typical_eps: float = 0.09
    typical_delta: float = 0.3

    def __post_init__(self) -> None:
        if self.truncated_vocab_size is None:
            self.truncated_vocab_size = self.vocab_size
        if self.acceptance not in ACCEPTANCE_MODES:
            raise ValueError(f"acceptance must be one of {ACCEPTANCE_MODES}, got {self.acceptance!r}")
        if not (self.typical_eps > 0 and self.typical_delta > 0):
            raise ValueError(
                f"typical_eps and typical_delta must be > 0, got {self.typical_eps} and {self.typical_delta}"
            )
        if self.tree is not None:
            self.tree = [[int(rank) for rank in path] for path in self.tree]

    def to_vllm_dict(self) -> dict[str, Any]:
        """The config.json of a vLLM MedusaModel directory, with our extras under EXTRAS_KEY."""
        config: dict[str, Any] = {"model_type": "medusa", "architectures": ["MedusaModel"]}
        config.update({key: getattr(self, name) for key, name in _VLLM_KEYS.items()})
        config[EXTRAS_KEY] = {name: getattr(self, name) for name in _EXTRA_FIELDS}
        return config

    def to_vllm_json(self) -> str:
        return json.dumps(self.to_vllm_dict(), indent=2)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> HeadsConfig:
        """Read a vLLM-style Medusa config dict (as written by to_vllm_dict). Missing optional keys take
        vLLM's meaning, e.g. no medusa_fc_bias means the residual layers have no bias."""
        missing = [key for key in _REQUIRED_KEYS if key not in config]
        if missing:
            raise ValueError(f"Medusa config lacks {missing}")
        kwargs = {name: config[key] for key, name in _VLLM_KEYS.items() if key in config}
        kwargs.setdefault("bias", False)
        extras = config.get(EXTRAS_KEY) or {}
        kwargs.update({name: extras[name] for name in _EXTRA_FIELDS if name in extras})
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> HeadsConfig:
        """Parse the text of a config.json written by to_vllm_json."""
        return cls.from_dict(json.loads(text))


class ResidualBlock(nn.Module):
    """One residual layer of all K heads at once: x + SiLU(W x + b), weights stacked over heads.

    weight: [K, H, H], bias: [K, H] or None. Both start at zero, so a fresh block is the identity.
    """

    def __init__(self, num_heads: int, hidden_size: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.empty(num_heads, hidden_size)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The bias is zeroed too (the reference zeroes only W), so a head starts as exactly its LM head.
        with torch.no_grad():
            self.weight.zero_()
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """x: [K, N, H] -> [K, N, H]."""
        y = torch.bmm(x, self.weight.transpose(1, 2))
        if self.bias is not None:
            y = y + self.bias.unsqueeze(1)
        return x + F.silu(y)


class MedusaHeads(nn.Module):
    """K Medusa heads, each `num_layers` residual layers followed by an LM head.

    shared_lm_head: one LM head [V', H] stored once and used by every head (vLLM's original_lm_head);
      otherwise lm_head is [K, V', H].
    token_map: [V'] int64 full-vocabulary ids of the V' LM-head rows (truncated vocabulary); None: V' = V.
    """

    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        num_heads: int,
        num_layers: int = 1,
        bias: bool = True,
        shared_lm_head: bool = False,
        token_map: Optional[Tensor] = None,
        logit_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if min(hidden_size, vocab_size, num_heads) < 1 or num_layers < 0:
            raise ValueError(
                f"need hidden_size, vocab_size, num_heads >= 1 and num_layers >= 0, got "
                f"{hidden_size}, {vocab_size}, {num_heads}, {num_layers}"
            )
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.bias = bias
        self.shared_lm_head = shared_lm_head
        self.logit_scale = float(logit_scale)
        self.blocks = nn.ModuleList(ResidualBlock(num_heads, hidden_size, bias) for _ in range(num_layers))
        if token_map is not None:
            token_map = _checked_token_map(token_map, vocab_size)
        self.register_buffer("token_map", token_map)
        rows = vocab_size if token_map is None else len(token_map)
        lm_shape = (rows, hidden_size) if shared_lm_head else (num_heads, rows, hidden_size)
        self.lm_head = nn.Parameter(torch.empty(lm_shape))
        nn.init.normal_(self.lm_head, std=hidden_size**-0.5)

    @property
    def truncated_vocab_size(self) -> int:
        """V', the number of logit columns."""
        return self.lm_head.shape[-2]

    @property
    def config(self) -> HeadsConfig:
        return HeadsConfig(
            hidden_size=self.hidden_size,
            vocab_size=self.vocab_size,
            num_heads=self.num_heads,
            num_layers=self.num_layers,
            bias=self.bias,
            shared_lm_head=self.shared_lm_head,
            truncated_vocab_size=self.truncated_vocab_size,
            logit_scale=self.logit_scale,
        )

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden: [..., H] -> logits [K, ..., V'] (columns are LM-head rows, see token_map)."""
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden has size {hidden.shape[-1]} in its last dim, heads expect {self.hidden_size}")
        lead = hidden.shape[:-1]
        x = hidden.reshape(1, -1, self.hidden_size).expand(self.num_heads, -1, -1)
        for block in self.blocks:
            x = block(x)
        if self.shared_lm_head:
            logits = x @ self.lm_head.T
        else:
            logits = torch.bmm(x, self.lm_head.transpose(1, 2))
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        return logits.reshape(self.num_heads, *lead, -1)

    @torch.no_grad()
    def topk_tokens(self, hidden: Tensor, k: int) -> Tensor:
        """hidden: [B, H] -> [B, K, k] int64: each head's top-k token ids (full vocabulary), best first."""
        if hidden.dim() != 2:
            raise ValueError(f"hidden must be [B, H], got shape {tuple(hidden.shape)}")
        if not 1 <= k <= self.truncated_vocab_size:
            raise ValueError(f"k must be in 1..{self.truncated_vocab_size}, got {k}")
        ranks = self(hidden).topk(k, dim=-1).indices  # [K, B, k] LM-head rows
        if self.token_map is not None:
            ranks = self.token_map[ranks]
        return ranks.transpose(0, 1).contiguous()

    @torch.no_grad()
    def init_from_lm_head(self, lm_head_weight: Tensor) -> None:
        """Start every head as the base LM head: copy lm_head_weight [V, H] (its token_map rows) into each
        head's LM head and zero the residual layers, so each head's logits equal the base model's."""
        expected = (self.vocab_size, self.hidden_size)
        if tuple(lm_head_weight.shape) != expected:
            raise ValueError(f"lm_head_weight must be [V, H] = {list(expected)}, got {list(lm_head_weight.shape)}")
        rows = lm_head_weight if self.token_map is None else lm_head_weight[self.token_map]
        self.lm_head.copy_(rows.expand_as(self.lm_head))
        for block in self.blocks:
            block.reset_parameters()


def _checked_token_map(token_map: Tensor, vocab_size: int) -> Tensor:
    """token_map: [V'] distinct integer ids in [0, vocab_size) -> int64 copy."""
    if token_map.dim() != 1 or token_map.numel() == 0 or token_map.is_floating_point():
        raise ValueError(
            f"token_map must be a non-empty 1-D integer tensor, got {token_map.dtype} {tuple(token_map.shape)}"
        )
    token_map = token_map.detach().to(torch.int64)
    if token_map.min() < 0 or token_map.max() >= vocab_size:
        raise ValueError(
            f"token_map ids must lie in [0, {vocab_size}), got range [{int(token_map.min())}, {int(token_map.max())}]"
        )
    if len(torch.unique(token_map)) != len(token_map):
        raise ValueError("token_map contains duplicate token ids")
    # vLLM ignores a token_map as long as the full vocabulary (config truncated_vocab_size == vocab_size)
    if len(token_map) >= vocab_size:
        raise ValueError(f"token_map must be shorter than the vocabulary ({vocab_size}); use None for the full one")
    return token_map.clone()
