"""build-tree writes a valid greedy tree, built from measured accuracies, into the heads' config.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vllm_medusa.checkpoint import load_heads, save_heads
from vllm_medusa.heads import MedusaHeads
from vllm_medusa.training import build_tree
from vllm_medusa.training.backbone import load_model
from vllm_medusa.tree import TreeSpec, build_sparse_tree


def test_build_tree_writes_tree_of_requested_size(tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    model = load_model(str(tiny_model_dir), torch.float32, torch.device("cpu"))
    heads = MedusaHeads(model.config.hidden_size, model.config.vocab_size, num_heads=3)
    heads.init_from_lm_head(model.get_output_embeddings().weight)
    save_heads(heads, tmp_path)
    argv = ["--heads", str(tmp_path), "--model", str(tiny_model_dir), "--data", str(tiny_data_dir),
            "--num-nodes", "12", "--topk", "4"]
    assert build_tree.main(argv) == 0
    _, config = load_heads(tmp_path)
    tree = TreeSpec.from_choices(config.tree)  # validates: prefix-closed, no duplicates
    report = json.loads((tmp_path / "accuracy.json").read_text())
    assert tree.num_nodes == 12 and tree.max_depth <= 3 and tree.topk <= 4
    assert tree.choices == build_sparse_tree(torch.tensor(report["rank_accuracies"]), 12).choices
    taus = [report["tau"][n] for n in ("4", "16", "32", "64")]
    assert taus == sorted(taus) and taus[0] >= 1.0 and len(report["top1"]) == 3

def test_build_tree_refuses_mt_bench(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        build_tree.main(["--heads", str(tmp_path), "--data", str(tmp_path / "mt_bench_questions.jsonl")])
