"""The benchmark commands' pure parts: tables, the server command line, the repetition measure."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks.typical_quality import repetition_rate
from vllm_medusa.bench import Result, engine_kwargs, markdown
from vllm_medusa.bench_serve import _report, _server


def test_importing_the_benchmarks_leaves_the_engine_mode_alone():
    """Tests run in-process engines: importing a benchmark must not switch vLLM to engine processes."""
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "1"


def test_offline_table_gives_ratios_to_plain():
    meta = {"dtype": "bfloat16", "prompts": 2, "max_tokens": 8, "repeats": 1, "machine": {"cpus": 2}, "date": "d"}
    rows = [Result("plain", 1, 0.0, 10.0, 1.0, 1.0, [10.0]), Result("tree-16", 1, 0.0, 15.0, 0.5, 1.8, [15.0])]
    table = markdown(rows, meta)
    assert "| 1 | 0 | tree-16 | 15.0 | 1.50x | 1.80 | 0.50 |" in table


def test_server_gets_the_speculative_config_as_json(tmp_path):
    extra = engine_kwargs("tree-16", tmp_path / "heads", tmp_path)
    args = _server(Path("/models/base"), "bfloat16", extra, tmp_path / "log").args
    spec = json.loads(args[args.index("--speculative-config") + 1])
    medusa = json.loads(args[args.index("--additional-config") + 1])
    assert spec == {"method": "medusa", "model": str(tmp_path / "heads")}
    assert medusa == {"medusa": {"tree": "medusa-16", "adaptive": False}}
    assert "--speculative-config" not in _server(Path("/m"), "bfloat16", engine_kwargs("plain", tmp_path, tmp_path),
                                                 tmp_path / "log").args


def test_serve_table_compares_each_concurrency_with_plain(tmp_path):
    point = lambda tps: {"output_throughput": tps, "median_ttft_ms": 50.0, "median_tpot_ms": 30.0,
                         "median_e2el_ms": 2000.0}
    results = {"plain": {1: point(20.0), 4: point(40.0)}, "adaptive": {1: point(26.0), 4: point(38.0)}}

    class Args:
        out, dtype, prompts, max_tokens = tmp_path, "bfloat16", 2, 8

    _report(results, Args, Path("/m"))
    table = (tmp_path / "serve.md").read_text()
    assert "| 1 | adaptive | 26.0 | 1.30x |" in table and "| 4 | adaptive | 38.0 | 0.95x |" in table
    assert json.loads((tmp_path / "serve.json").read_text())["results"]["adaptive"]["4"]["output_throughput"] == 38.0


@pytest.mark.parametrize("tokens, rate", [([1, 2, 3, 4, 1, 2, 3, 4], 0.2), ([5, 5, 5, 5, 5], 0.5), ([1, 2, 3], 0.0)])
def test_repetition_rate_counts_repeated_4grams(tokens, rate):
    assert repetition_rate(tokens) == pytest.approx(rate)
