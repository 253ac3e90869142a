"""Bad Medusa settings stop `LLM(...)` at start-up with one clear `MedusaConfigError` or `HeadsLoadError`
(frontend.py before the engine exists, worker.py when the heads load), never an engine that fails mid-step.

Each case starts a real engine (CPU, float32, in-process) with the shipped heads or a copy damaged on purpose.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import BASE_ENGINE_ARGS, shutdown

from vllm_medusa.checkpoint import HeadsLoadError
from vllm_medusa.shipped import shipped_heads_for
from vllm_medusa.vllm.settings import MedusaConfigError

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def heads(smollm2_f32) -> Path:
    found = shipped_heads_for(smollm2_f32)
    if found is None:
        pytest.skip("no shipped heads for SmolLM2")
    return found


def _start(model: Path, heads: Path, medusa: dict | None = None, **engine_args):
    from vllm import LLM

    args = {**BASE_ENGINE_ARGS, **engine_args}
    return LLM(model=str(model), speculative_config={"method": "medusa", "model": str(heads)},
               additional_config={"medusa": medusa or {}}, **args)


def _copy(heads: Path, target: Path, **config_changes) -> Path:
    """The heads' config and weights under `target`, config.json fields changed."""
    shutil.copytree(heads, target, ignore=shutil.ignore_patterns("distill"))
    config = json.loads((target / "config.json").read_text())
    config.update(config_changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def _damage(heads: Path, target: Path, how: str) -> Path:
    copy = _copy(heads, target)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if how == "missing":
        weights.unlink()
    elif how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    else:  # corrupt: garbage where the safetensors header (length + JSON) starts
        data[:64] = b"\xff" * 64
        weights.write_bytes(data)
    return copy


@pytest.mark.parametrize(
    "medusa, engine_args, message",
    [
        ({"tree": [[0], [0, 0], [1, 1]]}, {}, "Medusa tree: "),  # [1] missing: not prefix-closed
        ({"tree": [[0] * d for d in range(1, 7)]}, {}, "deep but"),  # 6 deep, 5 heads
        ({"tree": [[0], [9000]]}, {}, "top-9001 tokens"),  # wider than the heads' 8,192 candidates
        ({"num_nodes": 99}, {}, "cannot truncate"),
        ({}, {"max_num_batched_tokens": 16, "max_num_seqs": 4}, "max_num_batched_tokens=16"),
        ({"acceptance": "bogus"}, {}, "unknown Medusa acceptance mode 'bogus'"),
        ({"typical_eps": 1.5}, {}, "typical_eps must be in (0, 1)"),
    ],
    ids=["not_prefix_closed", "deeper_than_heads", "wider_than_heads", "num_nodes", "token_budget", "acceptance",
         "eps"],
)
def test_bad_settings_fail_at_start(smollm2_f32, heads, medusa, engine_args, message):
    with pytest.raises(MedusaConfigError) as caught:
        _start(smollm2_f32, heads, medusa, **engine_args)
    assert message in str(caught.value)


@pytest.mark.parametrize("field, value", [("hidden_size", 960), ("vocab_size", 32000)])
def test_heads_of_another_model_fail_at_start(smollm2_f32, heads, tmp_path, field, value):
    copy = _copy(heads, tmp_path / "heads", **{field: value})
    with pytest.raises(MedusaConfigError) as caught:
        _start(smollm2_f32, copy)
    assert f"have {field}={value}" in str(caught.value) and "trained for another model" in str(caught.value)


@pytest.mark.parametrize("how, message", [
    ("missing", "no Medusa head weights found"),
    ("truncated", "model.safetensors"),
    ("corrupt", "model.safetensors"),
])
def test_damaged_heads_file_fails_at_start(smollm2_f32, heads, tmp_path, how, message):
    copy = _damage(heads, tmp_path / "heads", how)
    with pytest.raises(HeadsLoadError) as caught:
        _start(smollm2_f32, copy)
    assert message in str(caught.value)


def test_tree_that_fits_the_token_budget_starts(smollm2_f32, heads):
    """The budget check is not off by one: 16 nodes + the root fill a budget of 17."""
    from vllm import SamplingParams

    llm = _start(smollm2_f32, heads, {"tree": "medusa-16", "adaptive": False},
                 max_num_batched_tokens=17, max_num_seqs=1)
    try:
        out = llm.generate(["Say hi."], SamplingParams(temperature=0, max_tokens=4))[0]
        assert len(out.outputs[0].token_ids) == 4
    finally:
        shutdown(llm)
