"""Small heads shared by the heads and checkpoint tests: every variant of the head design, random weights."""

from __future__ import annotations

import torch

from vllm_medusa.heads import MedusaHeads

H, V, K = 32, 100, 3
TOKEN_MAP = torch.randperm(V, generator=torch.Generator().manual_seed(1))[:40]
VARIANTS = {
    "per-head": {},
    "shared": {"shared_lm_head": True},
    "truncated": {"token_map": TOKEN_MAP},
    "shared-truncated": {"shared_lm_head": True, "token_map": TOKEN_MAP},
    "2-layers-no-bias-scaled": {"num_layers": 2, "bias": False, "logit_scale": 0.5},
}


def random_heads(**kwargs) -> MedusaHeads:
    """Heads with every weight random (fresh residual layers are zero, which would hide mix-ups)."""
    torch.manual_seed(0)
    heads = MedusaHeads(H, V, K, **kwargs)
    with torch.no_grad():
        for param in heads.parameters():
            param.normal_(0.0, 0.3)
    return heads
