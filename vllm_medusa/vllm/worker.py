"""Worker side of the plugin: build the tree step of a model runner from the engine config."""

from __future__ import annotations

import logging
from typing import Any

from vllm_medusa.vllm.attention import TREE_MODE
from vllm_medusa.vllm.settings import MedusaConfigError, load_settings, tree_mode_requested
from vllm_medusa.vllm.tree_step import TreeStep

logger = logging.getLogger("vllm_medusa")


def create_tree_step(vllm_config: Any) -> TreeStep | None:
    """A TreeStep when this engine runs tree Medusa, else None (and tree attention stays off)."""
    spec = vllm_config.speculative_config
    TREE_MODE.enabled = False
    if spec is None or not tree_mode_requested(spec.method, vllm_config.additional_config):
        return None
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise MedusaConfigError("tree Medusa does not support pipeline parallelism (pipeline_parallel_size > 1)")
    settings = load_settings(spec.model, vllm_config.additional_config)
    if spec.num_speculative_tokens < settings.tree.num_nodes:
        settings = type(settings)(
            settings.heads_dir, settings.tree.truncated(spec.num_speculative_tokens),
            settings.acceptance, settings.proposer,
        )
    model_config = vllm_config.model_config
    if settings.proposer:
        from vllm_medusa.vllm.patches import resolve

        return TreeStep(settings, heads=None, proposer=resolve(settings.proposer)(vllm_config))
    from vllm_medusa.checkpoint import load_heads

    heads, _ = load_heads(
        settings.heads_dir,
        hidden_size=model_config.get_hidden_size(),
        vocab_size=model_config.get_vocab_size(),
        dtype=model_config.dtype,
    )
    if settings.tree.max_depth > heads.num_heads:
        raise MedusaConfigError(
            f"the tree is {settings.tree.max_depth} deep but {settings.heads_dir} has {heads.num_heads} heads"
        )
    logger.info(
        "vllm-medusa: tree Medusa with %d nodes (depth %d) and %d heads from %s",
        settings.tree.num_nodes, settings.tree.max_depth, heads.num_heads, settings.heads_dir,
    )
    return TreeStep(settings, heads=heads.eval())
