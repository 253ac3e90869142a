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

def test_build_tree_from_recorded_accuracies(tmp_path: Path) -> None:
    heads = MedusaHeads(hidden_size=8, vocab_size=16, num_heads=2)
    save_heads(heads, tmp_path)
    acc = [[0.5, 0.2, 0.1], [0.3, 0.1, 0.05]]
    (tmp_path / "metrics.json").write_text(json.dumps({"rank_accuracies": acc, "top1": [0.5, 0.3], "top5": [0.8, 0.45],
                                                       "coverage": None, "tau": {}}))
    argv = ["--heads", str(tmp_path), "--accuracies", str(tmp_path / "metrics.json"), "--num-nodes", "5"]
    assert build_tree.main(argv) == 0
    _, config = load_heads(tmp_path)
    # node values: (0) .5, (1) .2, (0,0) .5*.3=.15, (2) .1, (1,0) .2*.3=.06; next would be (0,1) .05
    assert config.tree == [[0], [1], [2], [0, 0], [1, 0]]


def test_build_tree_refuses_mt_bench(tmp_path: Path) -> None:
    save_heads(MedusaHeads(hidden_size=8, vocab_size=16, num_heads=2), tmp_path)
    with pytest.raises(SystemExit):
        build_tree.main(["--heads", str(tmp_path), "--data", str(tmp_path / "mt_bench_questions.jsonl")])
