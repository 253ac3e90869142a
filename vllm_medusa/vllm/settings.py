"""What tree Medusa runs with: tree, acceptance defaults, proposer, read from the configs.

Precedence (later wins): the heads' `config.json` (written by training / build-tree), then the
server's `additional_config={"medusa": {...}}`. Per request, `SamplingParams.extra_args`
(`vllm_xargs` in the OpenAI API) may choose the acceptance rule and its eps/delta.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_medusa.tree import TreeSpec

ACCEPTANCE_MODES = ("auto", "greedy", "typical", "lossless")
# Keys accepted in additional_config["medusa"]; anything else is a typo worth an error.
SERVER_KEYS = {
    "mode", "tree", "acceptance", "typical_eps", "typical_delta", "proposer", "num_nodes", "adaptive", "gpu_tree",
}
# Keys accepted in SamplingParams.extra_args.
REQUEST_KEYS = {"medusa_acceptance", "typical_eps", "typical_delta"}
DEFAULT_TREE = "medusa-16"


class MedusaConfigError(ValueError):
    """A setting of tree Medusa is wrong; the message says which and how to fix it."""


@dataclass(frozen=True)
class Acceptance:
    """The acceptance rule of one request. "auto": greedy at temperature 0, lossless otherwise."""

    mode: str = "auto"
    typical_eps: float = 0.09
    typical_delta: float = 0.3

    def __post_init__(self) -> None:
        if self.mode not in ACCEPTANCE_MODES:
            raise MedusaConfigError(
                f"unknown Medusa acceptance mode {self.mode!r}; choose one of {', '.join(ACCEPTANCE_MODES)}"
            )
        if not (0.0 < self.typical_eps < 1.0 and math.isfinite(self.typical_eps)):
            raise MedusaConfigError(f"typical_eps must be in (0, 1), got {self.typical_eps}")
        if not (0.0 < self.typical_delta <= 1.0 and math.isfinite(self.typical_delta)):
            raise MedusaConfigError(f"typical_delta must be in (0, 1], got {self.typical_delta}")

    def for_request(self, extra_args: dict[str, Any] | None) -> Acceptance:
        """This default, overridden by a request's extra_args (validated)."""
        if not extra_args:
            return self
        return Acceptance(
            mode=str(extra_args.get("medusa_acceptance", self.mode)),
            typical_eps=_number(extra_args, "typical_eps", self.typical_eps),
            typical_delta=_number(extra_args, "typical_delta", self.typical_delta),
        )


def _number(options: dict[str, Any], key: str, default: float) -> float:
    value = options.get(key, default)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise MedusaConfigError(f"{key} must be a number, got {value!r}") from None


@dataclass(frozen=True)
class MedusaSettings:
    heads_dir: Path
    tree: TreeSpec
    acceptance: Acceptance
    proposer: str | None = None  # "module:attr" factory of a custom proposer (tests use an oracle)
    adaptive: bool = True  # size each step's tree by the cost model (False: always the whole tree)


def server_options(additional_config: dict[str, Any] | None) -> dict[str, Any]:
    options = dict((additional_config or {}).get("medusa") or {})
    unknown = set(options) - SERVER_KEYS
    if unknown:
        raise MedusaConfigError(
            f"unknown key(s) {sorted(unknown)} in additional_config['medusa']; known: {sorted(SERVER_KEYS)}"
        )
    return options


def tree_mode_requested(speculative_method: str | None, additional_config: dict[str, Any] | None) -> bool:
    """True when tree Medusa should run; `{"medusa": {"mode": "chain"}}` keeps vLLM's own chain Medusa."""
    if speculative_method != "medusa":
        return False
    mode = server_options(additional_config).get("mode", "tree")
    if mode not in ("tree", "chain"):
        raise MedusaConfigError(f"additional_config['medusa']['mode'] must be 'tree' or 'chain', got {mode!r}")
    return mode == "tree"


def engine_runs_trees(vllm_config: Any) -> bool:
    """tree_mode_requested for a built engine config (None: no engine, e.g. outside vLLM's config context)."""
    spec = None if vllm_config is None else vllm_config.speculative_config
    return spec is not None and tree_mode_requested(spec.method, vllm_config.additional_config)


def heads_config(heads_dir: str | Path) -> dict[str, Any]:
    path = Path(heads_dir) / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MedusaConfigError(f"{path} is not valid JSON: {exc}") from None


def resolve_tree(spec: Any, num_heads: int | None = None) -> TreeSpec:
    """A tree from a preset name, a node count, a JSON file path or a list of rank paths."""
    try:
        if isinstance(spec, TreeSpec):
            tree = spec
        elif isinstance(spec, (list, tuple)):
            tree = TreeSpec.from_choices(spec)
        elif isinstance(spec, int) or (isinstance(spec, str) and not Path(spec).is_file()):
            tree = TreeSpec.preset(spec)
        else:
            tree = TreeSpec.from_json(spec)
    except ValueError as error:  # TreeSpec's own message says what is wrong with the tree
        raise MedusaConfigError(f"Medusa tree: {error}") from None
    if num_heads is not None and tree.max_depth > num_heads:
        raise MedusaConfigError(
            f"the tree is {tree.max_depth} deep but the heads checkpoint has only {num_heads} heads; "
            f"use a tree of depth <= {num_heads}"
        )
    return tree


def stored_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """Our extras in the heads' config.json (key `vllm_medusa`, see heads.HeadsConfig); a reference-style
    `medusa_choices` key is honoured as the tree too."""
    from vllm_medusa.heads import EXTRAS_KEY

    stored = dict(config.get(EXTRAS_KEY) or {})
    if not stored.get("tree") and config.get("medusa_choices"):
        stored["tree"] = config["medusa_choices"]
    return stored


def load_settings(heads_dir: str | Path, additional_config: dict[str, Any] | None) -> MedusaSettings:
    stored = stored_defaults(heads_config(heads_dir))
    options = {**stored, **server_options(additional_config)}
    tree = resolve_tree(options.get("tree") or DEFAULT_TREE)
    if "num_nodes" in options:
        try:
            tree = tree.truncated(int(options["num_nodes"]))
        except ValueError as error:
            raise MedusaConfigError(f"additional_config['medusa']['num_nodes']: {error}") from None
    acceptance = Acceptance(
        mode=str(options.get("acceptance", "auto")),
        typical_eps=float(options.get("typical_eps", 0.09)),
        typical_delta=float(options.get("typical_delta", 0.3)),
    )
    return MedusaSettings(
        Path(heads_dir), tree, acceptance, options.get("proposer"), bool(options.get("adaptive", True))
    )
