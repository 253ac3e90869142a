"""`--speculative-model medusa|HEADS_DIR` and `--num-speculative-tokens N` on vLLM's own server parser.

Older vLLM releases and most Medusa guides spell speculative decoding this way; vLLM 0.32 dropped the
flags. vLLM loads general plugins inside `AsyncEngineArgs.add_cli_args`, just before it adds the
engine arguments (vllm/engine/arg_utils.py:3202-3204), so the plugin can add them to the parser of
`vllm serve` and of `python -m vllm.entrypoints.openai.api_server` (patches._patch_cli). After
parsing, the alias becomes `speculative_config` (the only spelling vLLM's EngineArgs reads).
Plain argparse only: the vLLM side lives in patches.py, and this stays unit-testable without vLLM.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from vllm_medusa.vllm.settings import MedusaConfigError

MODEL_DEST = "medusa_speculative_model"
TOKENS_DEST = "medusa_num_speculative_tokens"
# Other spellings of the speculative config in vLLM 0.32 (namespace dest -> flag), all exclusive with the alias.
OTHER_SPELLINGS = {
    "speculative_config": "--speculative-config",
    "spec_method": "--spec-method",
    "spec_model": "--spec-model",
    "spec_tokens": "--spec-tokens",
}


def add_alias_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "Medusa", "vllm-medusa: the old spelling of (tree) Medusa, mapped onto --speculative-config."
    )
    group.add_argument(
        "--speculative-model", dest=MODEL_DEST, default=None, metavar="medusa|HEADS_DIR",
        help="Tree Medusa. `medusa` finds the heads ($VLLM_MEDUSA_HEADS, then BASE/medusa/, then the heads "
        "shipped with vllm-medusa); a directory uses those heads. Same as --speculative-config "
        "'{\"method\": \"medusa\", \"model\": \"HEADS_DIR\"}'.",
    )
    group.add_argument(
        "--num-speculative-tokens", dest=TOKENS_DEST, type=int, default=None, metavar="N",
        help="With --speculative-model: tree nodes verified per step (default: the whole tree).",
    )


def alias_to_speculative_config(model: str, num_tokens: int | None) -> dict[str, Any]:
    """The speculative config that `--speculative-model MODEL [--num-speculative-tokens N]` stands for."""
    spec: dict[str, Any] = {"method": "medusa"}
    if model != "medusa":
        if not Path(model).is_dir():
            raise MedusaConfigError(
                f"--speculative-model takes `medusa` (find the heads) or a Medusa heads directory; "
                f"{model!r} is neither (draft models and other methods go in --speculative-config)"
            )
        spec["model"] = model
    if num_tokens is not None:
        spec["num_speculative_tokens"] = num_tokens
    return spec


def fold_alias(namespace: argparse.Namespace) -> None:
    """Replace the alias in a parsed namespace by `speculative_config`; MedusaConfigError on a conflict."""
    model = vars(namespace).pop(MODEL_DEST, None)
    num_tokens = vars(namespace).pop(TOKENS_DEST, None)
    if model is None:
        if num_tokens is not None:
            raise MedusaConfigError(
                "--num-speculative-tokens goes with --speculative-model; with --speculative-config put "
                "num_speculative_tokens inside its JSON"
            )
        return
    given = [flag for dest, flag in OTHER_SPELLINGS.items() if getattr(namespace, dest, None) is not None]
    if given:
        raise MedusaConfigError(
            f"--speculative-model is an alias for --speculative-config; give one of them, not both "
            f"(also given: {', '.join(given)})"
        )
    namespace.speculative_config = alias_to_speculative_config(model, num_tokens)


def install_error_hook() -> None:
    """Print a MedusaConfigError that ends a server start as its message, not as a traceback."""
    previous = sys.excepthook
    if getattr(previous, "medusa_errors", False):  # a parser is built more than once per process
        return

    def hook(kind: type[BaseException], error: BaseException, trace: TracebackType | None) -> None:
        if isinstance(error, MedusaConfigError):
            print(f"vllm-medusa: error: {error}", file=sys.stderr)
        else:
            previous(kind, error, trace)

    hook.medusa_errors = True  # type: ignore[attr-defined]
    sys.excepthook = hook
