"""Worker side of the plugin: build the tree step of a model runner from the engine config."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
from typing import Any

from vllm_medusa.adaptive import AdaptiveTree, StepCost, node_priors
from vllm_medusa.vllm.attention import TREE_MODE
from vllm_medusa.vllm.calibrate import load_or_measure
from vllm_medusa.vllm.settings import MedusaConfigError, engine_runs_trees, load_settings
from vllm_medusa.vllm.tree_step import TreeStep

logger = logging.getLogger("vllm_medusa")


def create_tree_step(vllm_config: Any) -> TreeStep | None:
    """A TreeStep when this engine runs tree Medusa, else None (and tree attention stays off)."""
    spec = vllm_config.speculative_config
    if not engine_runs_trees(vllm_config):
        return None  # TREE_MODE untouched: a tree engine may live in this process too (its layers check `runs_trees`)
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise MedusaConfigError("tree Medusa does not support pipeline parallelism (pipeline_parallel_size > 1)")
    settings = load_settings(spec.model, vllm_config.additional_config)
    if spec.num_speculative_tokens < settings.tree.num_nodes:
        settings = dataclasses.replace(settings, tree=settings.tree.truncated(spec.num_speculative_tokens))
    model_config = vllm_config.model_config
    prior = node_priors(settings.tree, measured_accuracies(settings.heads_dir))
    schedule = AdaptiveTree(settings.tree, StepCost.linear(1.0, 0.01), prior, settings.adaptive)
    calibrate = load_or_measure if settings.adaptive else None
    if settings.proposer:
        from vllm_medusa.vllm.patches import resolve

        proposer = resolve(settings.proposer)(vllm_config)
        return TreeStep(settings, schedule, heads=None, proposer=proposer, calibrate=calibrate)
    from vllm_medusa.checkpoint import load_heads

    heads, _ = load_heads(
        settings.heads_dir,
        hidden_size=model_config.get_hidden_size(),
        vocab_size=model_config.get_vocab_size(),
        dtype=model_config.dtype,
    )
    logger.info(
        "vllm-medusa: tree Medusa with %d nodes (depth %d) and %d heads from %s",
        settings.tree.num_nodes, settings.tree.max_depth, heads.num_heads, settings.heads_dir,
    )
    return TreeStep(settings, schedule, heads=heads.eval(), calibrate=calibrate)


def measured_accuracies(heads_dir: Path) -> np.ndarray | None:
    """[K, k] top-k accuracies per head written by `vllm-medusa build-tree` (accuracy.json), if any."""
    try:
        return np.asarray(json.loads((Path(heads_dir) / "accuracy.json").read_text())["rank_accuracies"])
    except (OSError, ValueError, KeyError):
        return None
