"""`vllm-medusa` console script: one subcommand per module, imported only when used.

Each subcommand module exposes `main(argv: list[str]) -> int` with its own argparse parser, so
`vllm-medusa train --help` shows that module's options and a slow import (vLLM, transformers) is
paid only by the commands that need it.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("vllm_medusa.demo", "plain vs Medusa generation on MT-Bench prompts with a real model"),
    "convert-gguf": ("vllm_medusa.convert", "turn a GGUF file into a Hugging Face model directory"),
    "distill": ("vllm_medusa.training.distill", "generate self-distillation answers with the base model"),
    "train": ("vllm_medusa.training.train", "train Medusa heads (--stage 1) or heads + backbone (--stage 2)"),
    "build-tree": ("vllm_medusa.training.build_tree", "measure head accuracies, build a sparse tree"),
    "serve": ("vllm_medusa.serve", "start vLLM's OpenAI server with the plugin (CPU-build equivalent of `vllm serve`)"),
    "bench": ("vllm_medusa.bench", "side-by-side throughput benchmark through vLLM"),
    "bench-serve": ("vllm_medusa.bench_serve", "the same configurations behind the OpenAI server, `vllm bench serve` client"),
    "calibrate": ("vllm_medusa.vllm.calibrate", "measure and cache this machine's step-cost curve for adaptive trees"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: vllm-medusa COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run `vllm-medusa COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vllm-medusa: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
