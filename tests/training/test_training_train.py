"""Tiny end-to-end training runs on CPU: trained heads must beat their initial heads on held-out data."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vllm_medusa.checkpoint import load_heads
from vllm_medusa.heads import MedusaHeads
from vllm_medusa.training import train
from vllm_medusa.training.backbone import load_model, load_tokenizer
from vllm_medusa.training.build_tree import evaluate
from vllm_medusa.training.hidden import collect

COMMON = ["--num-heads", "3", "--batch-tokens", "512", "--epochs", "3", "--lr", "1e-2", "--save-dtype", "float32",
          "--eval-topk", "3"]


def heldout_tokens(model_dir: Path, data_dir: Path, num_heads: int):
    model = load_model(str(model_dir), torch.float32, torch.device("cpu"))
    tokenizer = load_tokenizer(str(model_dir))
    sequences = train.encode_file(tokenizer, data_dir / "heldout.jsonl", 256)
    return model, collect(model, sequences, num_heads, 4096, tokenizer.pad_token_id)


def test_stage1_heads_beat_initial_heads_and_resume(tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "heads"
    args = ["--stage", "1", "--model", str(tiny_model_dir), "--data", str(tiny_data_dir), "--out", str(out),
            "--head-vocab", "30", "--cache-dir", str(tmp_path / "cache"), *COMMON]
    assert train.main(args) == 0
    trained, config = load_heads(out)
    assert config.num_heads == 3 and trained.token_map is not None and len(trained.token_map) == 25  # the 25 answer tokens
    model, tokens = heldout_tokens(tiny_model_dir, tiny_data_dir, 3)
    initial = MedusaHeads(trained.hidden_size, trained.vocab_size, 3, token_map=trained.token_map)
    initial.init_from_lm_head(model.get_output_embeddings().weight)
    before, after = evaluate(initial, tokens, 3), evaluate(trained, tokens, 3)
    assert all(a > b + 0.3 for a, b in zip(after["top1"], before["top1"])), (before["top1"], after["top1"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["top1"] == after["top1"] and metrics["coverage"] == 1.0
    # a finished run resumed from its last checkpoint does no further steps and gives the same heads
    assert train.main([*args, "--resume"]) == 0
    again, _ = load_heads(out)
    assert torch.equal(again.lm_head, trained.lm_head)


def test_stage2_lora_writes_backbone_heads_and_drift(tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "joint"
    args = ["--stage", "2", "--model", str(tiny_model_dir), "--data", str(tiny_data_dir), "--out", str(out),
            "--lora-rank", "4", "--heads-warmup-steps", "2", "--drift-prompts", "2", "--drift-tokens", "8",
            "--hidden-batch-tokens", "4096", *COMMON, "--epochs", "1", "--batch-size", "32"]
    assert train.main(args) == 0
    heads, _ = load_heads(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stage"] == 2 and 0 <= metrics["greedy_identical"] <= 1 and metrics["heldout_kl"] >= 0
    assert min(metrics["top1"]) > 0.5
    assert (out / "backbone" / "config.json").exists() and (out / "adapter").is_dir()
    merged = load_model(str(out / "backbone"), torch.float32, torch.device("cpu"))
    assert merged.config.hidden_size == heads.hidden_size
