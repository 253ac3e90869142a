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
