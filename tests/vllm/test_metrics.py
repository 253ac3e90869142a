"""vLLM's own spec-decode metrics stay consistent under tree Medusa (CPU, float32, shipped SmolLM2 heads).

vLLM counts a tree like a chain of N drafts: a verification step of one request is one "draft" of N
tokens, "accepted" is the accepted path length, and accepted-per-position i counts paths reaching depth
i + 1. So vLLM's counters must agree with our TreeStats and with the tokens the user gets:
  drafts = trees, drafts + accepted = tokens emitted by verification steps, per-position = per-depth,
  generation tokens = one prefill token per request + emitted - tokens cut by max_tokens / EOS,
and the periodic log line must show the same mean acceptance length (tau) and per-depth rates.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import pytest
from conftest import make_prompts, reset_tree_stats, shipped_heads_engine, shutdown, tree_stats

pytestmark = pytest.mark.vllm

# Depth 4 with branches; shipped heads have 5 heads.
METRICS_TREE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0, 0]]
NUM_PROMPTS = 8
MAX_TOKENS = 24
SPEC_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens", "vllm:generation_tokens")
PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos"


@pytest.fixture(scope="module")
def medusa(smollm2_f32):
    llm = shipped_heads_engine(
        smollm2_f32, {"tree": METRICS_TREE, "adaptive": False}, per_request_spec_decode_metrics="detailed"
    )
    yield llm
    shutdown(llm)


@pytest.fixture(scope="module")
def batch(smollm2_f32) -> tuple[list[str], list]:
    """Greedy and sampled requests in one batch."""
    from vllm import SamplingParams

    prompts = make_prompts(smollm2_f32, NUM_PROMPTS)
    params = [
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS) if i % 2 == 0
        else SamplingParams(temperature=0.7, max_tokens=MAX_TOKENS, seed=i)
        for i in range(NUM_PROMPTS)
    ]
    return prompts, params


def spec_snapshot(llm) -> dict[str, object]:
    """vLLM's spec-decode counters and generation tokens: name -> value (per-position: a list)."""
    snapshot: dict[str, object] = {}
    for metric in llm.get_metrics():
        if metric.name in SPEC_COUNTERS:
            snapshot[metric.name] = snapshot.get(metric.name, 0) + metric.value
        elif metric.name == PER_POSITION:
            snapshot[PER_POSITION] = list(metric.values)
    return snapshot


def delta(before: dict, after: dict) -> dict[str, object]:
    out: dict[str, object] = {name: after[name] - before.get(name, 0) for name in SPEC_COUNTERS}
    old = before.get(PER_POSITION) or [0] * len(after[PER_POSITION])
    out[PER_POSITION] = [a - b for a, b in zip(after[PER_POSITION], old)]
    return out


def test_vllm_counters_agree_with_tree_stats_and_outputs(medusa, batch):
    prompts, params = batch
    before = spec_snapshot(medusa)
    reset_tree_stats(medusa)
    outputs = medusa.generate(prompts, params, use_tqdm=False)
    counts = delta(before, spec_snapshot(medusa))
    stats = tree_stats(medusa)
    drafts = counts["vllm:spec_decode_num_drafts"]
    accepted = counts["vllm:spec_decode_num_accepted_tokens"]
    per_position = counts[PER_POSITION]
    depth = len(stats["accepted_per_depth"])
    print(f"vLLM: {counts}\nTreeStats: {stats}")

    assert stats["fallback_steps"] == 0 and stats["accepted_per_depth"][1] > 0  # depth >= 2 was reached
    assert accepted <= counts["vllm:spec_decode_num_draft_tokens"] == drafts * len(METRICS_TREE)
    assert drafts == stats["trees"]  # one draft per request-step with a tree
    assert drafts + accepted == stats["emitted"]  # each step emits its accepted path + one token
    assert per_position[:depth] == stats["accepted_per_depth"] and not any(per_position[depth:])
    assert 1 + accepted / drafts == pytest.approx(stats["tau"])

    # Per request (vLLM's detailed per-request metrics): one prefill token, then per verification step
    # the accepted path + one token; only the last step may overshoot max_tokens / EOS, by at most its path.
    cut = []
    for output in outputs:
        completion = output.outputs[0]
        spec = completion.spec_decode_metrics.to_dict()
        emitted = 1 + spec["num_spec_steps"] + spec["num_accepted_draft_tokens"]
        cut.append(emitted - len(completion.token_ids))
        assert 0 <= cut[-1] <= spec["per_step_accepted"][-1]
    assert sum(o.outputs[0].spec_decode_metrics.to_dict()["num_spec_steps"] for o in outputs) == drafts
    assert counts["vllm:generation_tokens"] == sum(len(o.outputs[0].token_ids) for o in outputs)
    assert counts["vllm:generation_tokens"] == len(outputs) + drafts + accepted - sum(cut)


def test_log_line_shows_tau_and_per_depth_acceptance(medusa, batch, monkeypatch):
    """vLLM's periodic "SpecDecoding metrics" line (SpecDecodingLogging) carries tau and per-depth rates."""
    prompts, params = batch
    engine = medusa.llm_engine
    engine.do_log_stats()  # flush what earlier steps left in the logger
    monkeypatch.setattr(engine, "do_log_stats_with_interval", lambda: None)  # one line for this batch only
    reset_tree_stats(medusa)
    medusa.generate(prompts, params, use_tqdm=False)
    lines = _captured_spec_lines(engine.do_log_stats)
    stats = tree_stats(medusa)
    print("\n".join(lines))

    assert len(lines) == 1
    line = lines[0]
    assert float(_field(line, r"Mean acceptance length: ([\d.]+)")) == pytest.approx(stats["tau"], abs=0.005)
    assert int(_field(line, r"Drafted: (\d+) tokens")) == stats["trees"] * len(METRICS_TREE)
    assert int(_field(line, r"Accepted: (\d+) tokens")) == stats["emitted"] - stats["trees"]
    rates = [float(r) for r in _field(line, r"Per-position acceptance rate: ([\d., ]+?), Avg").split(", ")]
    per_depth = [count / stats["trees"] for count in stats["accepted_per_depth"]]  # printed with 3 decimals
    assert rates[: len(per_depth)] == pytest.approx(per_depth, abs=5e-4) and not any(rates[len(per_depth):])


def _captured_spec_lines(log: Callable[[], None]) -> list[str]:
    """The SpecDecoding lines that `log()` writes (at INFO, or DEBUG when the engine is idle)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger("vllm.v1.metrics.loggers")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        log()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return [r.getMessage() for r in records if "SpecDecoding metrics" in r.getMessage()]


def _field(line: str, pattern: str) -> str:
    match = re.search(pattern, line)
    assert match, f"{pattern!r} not in {line!r}"
    return match.group(1)
