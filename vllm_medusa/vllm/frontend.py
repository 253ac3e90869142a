"""Front-end side of the plugin: turn the user's speculative config into one vLLM accepts.

Runs in the process that builds the engine config, before `SpeculativeConfig` exists, so errors here
reach the user at start-up as one clear message instead of a traceback from deep inside vLLM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vllm_medusa.vllm.settings import MedusaConfigError, load_settings, server_options, tree_mode_requested

MAX_NODES = 128  # vLLM's rejection sampler bound on drafts per request (MAX_SPEC_LEN)
HEADS_ENV = "VLLM_MEDUSA_HEADS"


def discover_heads(base_model: str) -> Path:
    """Heads for a base model when the config names none, in this order:
    1. $VLLM_MEDUSA_HEADS; 2. BASE/medusa/ (a folder inside the base model's directory);
    3. the heads shipped with vllm-medusa for that model (matched by the base's config)."""
    from vllm_medusa.shipped import shipped_heads_for

    looked = []
    env = os.environ.get(HEADS_ENV)
    if env:
        if (Path(env) / "config.json").is_file():
            return Path(env)
        looked.append(f"${HEADS_ENV}={env} (no config.json there)")
    else:
        looked.append(f"${HEADS_ENV} (not set)")
    inside = Path(base_model) / "medusa"
    if (inside / "config.json").is_file():
        return inside
    looked.append(f"{inside}/ (missing)")
    shipped = shipped_heads_for(base_model)
    if shipped is not None:
        return shipped
    looked.append("heads shipped with vllm-medusa (none for this model)")
    raise MedusaConfigError(
        "speculative method 'medusa' needs Medusa heads and none were found. Looked in:\n  - "
        + "\n  - ".join(looked)
        + "\nPass them with --speculative-config '{\"method\": \"medusa\", \"model\": \"HEADS_DIR\"}', or train "
        "heads: `vllm-medusa distill ...` then `vllm-medusa train --stage 1 ...` (see README, Training)."
    )


def prepare_speculative_config(
    spec: dict[str, Any],
    target_model_config: Any,
    additional_config: dict[str, Any] | None,
    max_num_batched_tokens: int | None = None,
) -> dict[str, Any]:
    """The user's speculative config with heads found and `num_speculative_tokens` set from the tree;
    `max_num_batched_tokens` is the step token budget when the user set one (None: vLLM's default)."""
    if not tree_mode_requested(spec.get("method"), additional_config):
        return spec
    from vllm.platforms import current_platform

    gpu_opt_in = current_platform.is_cuda() and server_options(additional_config).get("gpu_tree") is True
    if not current_platform.is_cpu() and not gpu_opt_in:
        # The GPU path (vllm_medusa/vllm/gpu_attention.py) is verified in parts only (kernels on an H100,
        # metadata on CPU): it has not run inside vLLM end to end, so it is not switched on silently.
        raise MedusaConfigError(
            "tree Medusa is verified end to end on vLLM's CPU backend only; on CUDA its FlashAttention tree path "
            "is experimental: opt in with additional_config {\"medusa\": {\"gpu_tree\": true}} and the "
            "FLASH_ATTN attention backend, or use {\"medusa\": {\"mode\": \"chain\"}} for vLLM's own chain Medusa"
        )
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "1":
        raise MedusaConfigError(
            "tree Medusa runs on vLLM's V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER "
            "(vLLM's V2 runner does not support Medusa)"
        )
    spec = dict(spec)
    if not spec.get("model"):
        spec["model"] = str(discover_heads(target_model_config.model))
    heads_dir = Path(spec["model"])
    if not heads_dir.is_dir():
        raise MedusaConfigError(f"Medusa heads directory {heads_dir} does not exist")
    settings = load_settings(heads_dir, additional_config)
    _check_heads_match(heads_dir, target_model_config)
    num_nodes = settings.tree.num_nodes
    if num_nodes > MAX_NODES:
        raise MedusaConfigError(f"the tree has {num_nodes} nodes; vLLM verifies at most {MAX_NODES} per request")
    requested = spec.get("num_speculative_tokens")
    if requested is None:
        spec["num_speculative_tokens"] = num_nodes
    elif not 1 <= int(requested) <= num_nodes:
        raise MedusaConfigError(
            f"num_speculative_tokens={requested} but the tree has {num_nodes} nodes; with tree Medusa it is "
            f"the number of tree nodes to verify (1..{num_nodes}); leave it out to use the whole tree"
        )
    verified = int(spec["num_speculative_tokens"])
    if settings.proposer is None:
        _check_heads_fit_tree(heads_dir, target_model_config, settings.tree.truncated(verified))
    # A request's root and nodes go in one step: a budget below that would cut every tree.
    if max_num_batched_tokens is not None and verified + 1 > max_num_batched_tokens:
        raise MedusaConfigError(
            f"the tree has {verified} nodes, so one request's verification step feeds {verified + 1} tokens, more "
            f"than max_num_batched_tokens={max_num_batched_tokens}; raise max_num_batched_tokens or use a smaller "
            f"tree (additional_config {{\"medusa\": {{\"num_nodes\": {max_num_batched_tokens - 1}}}}})"
        )
    return spec


def _check_heads_fit_tree(heads_dir: Path, target_model_config: Any, tree: Any) -> None:
    """Load the heads here, before the engine: vLLM parses the weights' headers while it builds the draft
    config, where a damaged file would surface as an unrelated error from deep inside vLLM; and a tree the
    heads cannot fill is refused before the base model loads."""
    from vllm_medusa.checkpoint import load_heads

    hf = target_model_config.hf_config
    heads, _ = load_heads(heads_dir, hidden_size=hf.hidden_size, vocab_size=hf.vocab_size)
    if tree.max_depth > heads.num_heads:
        raise MedusaConfigError(f"the tree is {tree.max_depth} deep but {heads_dir} has {heads.num_heads} heads")
    if tree.topk > heads.truncated_vocab_size:
        raise MedusaConfigError(
            f"the tree uses each head's top-{tree.topk} tokens but the heads in {heads_dir} "
            f"score only {heads.truncated_vocab_size} tokens"
        )


def _check_heads_match(heads_dir: Path, target_model_config: Any) -> None:
    from vllm_medusa.vllm.settings import heads_config

    config = heads_config(heads_dir)
    hf = target_model_config.hf_config
    for key in ("hidden_size", "vocab_size"):
        theirs, ours = config.get(key), getattr(hf, key, None)
        if theirs is not None and ours is not None and int(theirs) != int(ours):
            raise MedusaConfigError(
                f"Medusa heads in {heads_dir} have {key}={theirs} but the base model "
                f"{target_model_config.model} has {key}={ours}: these heads were trained for another model"
            )
