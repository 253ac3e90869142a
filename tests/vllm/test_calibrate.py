"""`vllm-medusa calibrate`: measures the step-cost curve and caches it where Medusa engines read it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.vllm


def test_calibrate_caches_the_curve_an_engine_then_reads(smollm2_f32, tmp_path, monkeypatch):
    env = {"VLLM_MEDUSA_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "vllm_medusa.cli", "calibrate", str(smollm2_f32), "--dtype", "float32",
         "--max-num-batched-tokens", "64", "--repeats", "2"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [cached] = list((tmp_path / "cost").glob("*.json"))
    curve = json.loads(cached.read_text())
    assert curve["sizes"] == [1, 2, 4, 8, 16, 32, 64]  # the grid up to the step budget
    assert all(s > 0 for s in curve["seconds"]) and curve["seconds"][-1] > curve["seconds"][0]
    assert f"cached in {cached}" in done.stdout and "| 64 |" in done.stdout

    # a Medusa engine of the same model, dtype and parallelism reads it instead of measuring
    from vllm_medusa.adaptive import StepCost
    from vllm_medusa.vllm import calibrate

    monkeypatch.setenv("VLLM_MEDUSA_CACHE", str(tmp_path))
    monkeypatch.setattr(calibrate, "measure", lambda runner, repeats=3: pytest.fail("measured again"))

    class Runner:  # what load_or_measure reads of a runner
        vllm_config = _vllm_config(smollm2_f32)

    assert calibrate.load_or_measure(Runner()).to_json() == StepCost.from_json(curve).to_json()


def test_calibrate_missing_model_is_one_clear_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vllm_medusa.cli", "calibrate", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert f"model directory {tmp_path / 'missing'} does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def _vllm_config(model_dir):
    from types import SimpleNamespace

    import torch

    return SimpleNamespace(model_config=SimpleNamespace(model=str(model_dir), dtype=torch.float32),
                           parallel_config=SimpleNamespace(tensor_parallel_size=1))
