"""Fixtures for tests that run a real vLLM engine (CPU, float32, in-process, eager).

In-process engines (VLLM_ENABLE_V1_MULTIPROCESSING=0) let a test reach the worker's tree step
(stats, mutation switches) directly and start in a few seconds.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One OpenMP thread: otherwise vLLM's CPU worker binds two threads to the two cores and, on a machine
# shared with other jobs, every small torch op waits for the busy core (measured ~5 ms/op, steps ~8x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")

ORACLE = str(Path(__file__).with_name("oracle.py").resolve()) + ":make_oracle"
# Depth-4 tree whose true path (1, 1, 1, 1) lies on non-first branches (the oracle's rank).
ORACLE_TREE = [[0], [1], [2], [0, 0], [1, 0], [1, 1], [2, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]]
BASE_ENGINE_ARGS = dict(
    dtype="float32", enforce_eager=True, max_model_len=2048, seed=0, max_num_seqs=64, disable_log_stats=False
)

pytest.importorskip("vllm")


def make_prompts(model_dir: Path, count: int) -> list[str]:
    """`count` chat prompts of mixed lengths: MT-Bench first turns, cut at different word counts."""
    from transformers import AutoTokenizer

    from vllm_medusa.mtbench import load_mtbench

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    questions = load_mtbench()
    prompts = []
    for i in range(count):
        words = questions[(i * 7) % len(questions)].turns[0].split()
        keep = [3, 8, 20, 60, 400][i % 5]
        message = [{"role": "user", "content": " ".join(words[:keep])}]
        prompts.append(tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True))
    return prompts


def write_oracle(path: Path, outputs) -> None:
    """Reference sequences (prompt + greedy output) for the oracle proposer."""
    sequences = [list(o.prompt_token_ids) + list(c.token_ids) for o in outputs for c in o.outputs]
    path.write_text(json.dumps({"sequences": sequences}))


def tree_stats(llm) -> dict:
    return llm.collective_rpc(lambda self: self.model_runner._medusa.stats.as_dict())[0]


def reset_tree_stats(llm) -> None:
    llm.collective_rpc(lambda worker: worker.model_runner._medusa.reset_stats())


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def write_config_heads(heads: Path, tree: list[list[int]]) -> Path:
    """A heads directory holding only a config with `tree` (a test proposer drafts, no weights needed)."""
    (heads / "config.json").write_text(
        json.dumps({"model_type": "medusa", "hidden_size": 576, "vocab_size": 49152,
                    "num_heads": max(len(path) for path in tree), "vllm_medusa": {"tree": tree}})
    )
    return heads


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="session")
def oracle_heads(tmp_path_factory) -> Path:
    """A heads directory for the oracle proposer."""
    return write_config_heads(tmp_path_factory.mktemp("oracle_heads"), ORACLE_TREE)


def shipped_heads_engine(model_dir: Path, medusa_options: dict, **engine_args):
    """An engine running tree Medusa with the heads shipped for `model_dir` (skips if none are)."""
    from vllm import LLM

    from vllm_medusa.shipped import shipped_heads_for

    heads = shipped_heads_for(model_dir)
    if heads is None:
        pytest.skip("no shipped heads for SmolLM2")
    return LLM(
        model=str(model_dir),
        speculative_config={"method": "medusa", "model": str(heads)},
        additional_config={"medusa": medusa_options},
        **engine_args,
        **BASE_ENGINE_ARGS,
    )
