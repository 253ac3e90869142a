"""The demo runs end to end (smoke size), so `make demo` cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.vllm


def test_demo_smoke(smollm2_f32):
    pytest.importorskip("vllm")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "vllm_medusa.cli", "demo", "--smoke"],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ") and "|---" not in line]
    assert len(table) == 3  # header + 2 prompts
    summary = re.search(r"mean tau ([\d.]+) \(tokens per step with a tree\), mean speedup ([\d.]+)x, (\d+)/(\d+) outputs identical", result.stdout)
    assert summary, result.stdout[-2000:]
    tau, _, same, total = float(summary[1]), summary[2], int(summary[3]), int(summary[4])
    assert tau >= 1.0
    assert same == total == 2  # float32: Medusa output equals plain vLLM
