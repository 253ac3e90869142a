"""Heads shipped inside the package, found by the base model they were trained for."""

from __future__ import annotations

import json
from pathlib import Path

HEADS_ROOT = Path(__file__).parent / "shipped_heads"


def shipped_heads_for(base_model: str | Path) -> Path | None:
    """The shipped heads whose recorded base config matches `base_model`'s config.json, if any."""
    config_path = Path(base_model) / "config.json"
    if not config_path.is_file() or not HEADS_ROOT.is_dir():
        return None
    base = json.loads(config_path.read_text())
    for heads in sorted(HEADS_ROOT.iterdir()):
        manifest = heads / "base_model.json"
        if manifest.is_file() and _same_model(base, json.loads(manifest.read_text())):
            return heads
    return None


def _same_model(base: dict, recorded: dict) -> bool:
    keys = ("model_type", "hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads")
    return all(base.get(k) == recorded.get(k) for k in keys)


def default_heads(model_dir: Path) -> Path:
    """The shipped trained heads for SmolLM2, or random heads (made once) if none are shipped."""
    shipped = shipped_heads_for(model_dir)
    if shipped is not None:
        return shipped
    return random_heads(model_dir)


def random_heads(model_dir: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_medusa.checkpoint import save_heads
    from vllm_medusa.heads import MedusaHeads
    from vllm_medusa.tree import TreeSpec

    out = model_dir.parent / f"{model_dir.name}-random-heads"
    if (out / "config.json").is_file():
        return out
    print("[demo] no trained heads shipped: using random heads (tau will be low)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    weight = model.get_output_embeddings().weight.detach()
    torch.manual_seed(0)
    heads = MedusaHeads(weight.shape[1], weight.shape[0], num_heads=4, token_map=torch.arange(8192))
    heads.init_from_lm_head(weight)
    save_heads(heads, out, tree=TreeSpec.preset("medusa-16"))
    return out
