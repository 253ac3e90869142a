"""vLLM's OpenAI server with tree Medusa, started as users start it: `vllm-medusa serve BASE --speculative-model medusa`.

One server for the module (start-up takes 30-60 s on two cores): the bare word `medusa` finds the oracle
heads through $VLLM_MEDUSA_HEADS, and the oracle proposer (tests/vllm/oracle.py) knows the plain greedy
continuations, computed first by an in-process plain engine. The whole tree runs every step (no adaptive
sizing), so deep paths are accepted. Every server runs in its own process group, killed in teardown.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import BASE_ENGINE_ARGS, ORACLE, shutdown, write_oracle

from vllm_medusa import server_process

pytestmark = pytest.mark.vllm

MAX_TOKENS = 32
PROMPT = "The three most important things to know about the history of Rome are"
CHAT = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]
START_TIMEOUT_S = 300  # two shared cores: a start took 30-60 s alone, longer under load
REQUEST_TIMEOUT_S = 120
SERVER_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", str(BASE_ENGINE_ARGS["max_model_len"]),
               "--seed", "0", "--host", "127.0.0.1"]


@dataclass(frozen=True)
class Reference:
    completion: str
    chat: str
    oracle_file: Path


# -- a server process ----------------------------------------------------------------------------
def _server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_MEDUSA_HEADS", "VLLM_ENABLE_V1_MULTIPROCESSING")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", **extra)
    return env


# -- HTTP ------------------------------------------------------------------------------------------
def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        return json.loads(response.read())


def _post_stream(url: str, body: dict) -> Iterator[dict]:
    request = urllib.request.Request(url, json.dumps({**body, "stream": True}).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        for line in response:
            data = line.decode().strip().removeprefix("data: ")
            if data and data != "[DONE]":
                yield json.loads(data)


def _completion(**extra) -> dict:
    return {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}


def _chat(**extra) -> dict:
    return {"messages": CHAT, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}


def _counter(metrics: str, name: str) -> float:
    """Sum of a Prometheus counter over its label sets."""
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", metrics, re.MULTILINE))


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(smollm2_f32, tmp_path_factory) -> Reference:
    """Plain vLLM's greedy texts, and the oracle file built from the same runs."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(smollm2_f32), **BASE_ENGINE_ARGS)
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    completion = llm.generate([PROMPT], greedy)
    chat = llm.chat(CHAT, greedy)
    shutdown(llm)
    oracle_file = tmp_path_factory.mktemp("server_oracle") / "oracle.json"
    write_oracle(oracle_file, [*completion, *chat])
    return Reference(completion[0].outputs[0].text, chat[0].outputs[0].text, oracle_file)


@pytest.fixture(scope="module")
def server(smollm2_f32, oracle_heads, reference, tmp_path_factory) -> Iterator[str]:
    """The base URL of a running `vllm-medusa serve BASE --speculative-model medusa`."""
    port = server_process.free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = [str(smollm2_f32), "--speculative-model", "medusa", "--port", str(port), *SERVER_ARGS,
            "--additional-config", json.dumps({"medusa": {"proposer": ORACLE, "adaptive": False}})]
    env = _server_env(VLLM_MEDUSA_HEADS=str(oracle_heads), MEDUSA_ORACLE_FILE=str(reference.oracle_file))
    process = server_process.start(args, env, log)
    try:
        server_process.wait_ready(process, url, log, START_TIMEOUT_S)
        yield url
    finally:
        server_process.stop(process)


# -- the running server ---------------------------------------------------------------------------
def test_completion_equals_plain_greedy(server, reference):
    body = _post(f"{server}/v1/completions", _completion())
    assert body["choices"][0]["text"] == reference.completion


def test_streamed_completion_equals_plain_greedy(server, reference):
    chunks = _post_stream(f"{server}/v1/completions", _completion())
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == reference.completion


def test_chat_equals_plain_greedy(server, reference):
    body = _post(f"{server}/v1/chat/completions", _chat())
    assert body["choices"][0]["message"]["content"] == reference.chat


def test_streamed_chat_equals_plain_greedy(server, reference):
    chunks = _post_stream(f"{server}/v1/chat/completions", _chat())
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == reference.chat


def test_metrics_show_medusa_drafts(server, reference):
    _post(f"{server}/v1/completions", _completion())  # at least one Medusa request, whatever ran before
    with urllib.request.urlopen(f"{server}/metrics", timeout=REQUEST_TIMEOUT_S) as response:
        metrics = response.read().decode()
    drafts = _counter(metrics, "vllm:spec_decode_num_drafts_total")
    drafted = _counter(metrics, "vllm:spec_decode_num_draft_tokens_total")
    accepted = _counter(metrics, "vllm:spec_decode_num_accepted_tokens_total")
    assert drafts > 0
    assert accepted <= drafted
    assert accepted / drafts >= 1.0  # tau = 1 + accepted / drafts >= 2: the oracle's deep paths were taken


def test_request_may_choose_typical_acceptance(server):
    body = _post(f"{server}/v1/completions", _completion(vllm_xargs={"medusa_acceptance": "typical"}))
    assert body["choices"][0]["text"] and body["usage"]["completion_tokens"] > 0


def test_unknown_acceptance_mode_fails_that_request_only(server, reference):
    with pytest.raises(urllib.error.HTTPError) as caught:
        _post(f"{server}/v1/completions", _completion(vllm_xargs={"medusa_acceptance": "bogus"}))
    assert caught.value.code == 400
    assert "unknown Medusa acceptance mode 'bogus'" in caught.value.read().decode()
    body = _post(f"{server}/v1/completions", _completion())  # the engine still serves
    assert body["choices"][0]["text"] == reference.completion


# -- start-up errors -------------------------------------------------------------------------------
def _base_without_heads(model_dir: Path, target: Path) -> Path:
    """The model's files under a config that no shipped heads match (one more layer, never loaded:
    the heads search fails while the engine config is built), so no heads exist anywhere for it."""
    target.mkdir()
    for item in model_dir.iterdir():
        if item.name != "config.json":
            (target / item.name).symlink_to(item)
    config = json.loads((model_dir / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_bare_medusa_without_heads_fails_at_start_listing_where_it_looked(smollm2_f32, tmp_path):
    base = _base_without_heads(smollm2_f32, tmp_path / "base")
    log = tmp_path / "server.log"
    process = server_process.start([str(base), "--speculative-model", "medusa", "--port", str(server_process.free_port()), *SERVER_ARGS],
                     _server_env(), log)
    try:
        process.wait(timeout=START_TIMEOUT_S)
    finally:
        server_process.stop(process)
    output = log.read_text()
    assert process.returncode != 0
    assert "vllm-medusa: error: speculative method 'medusa' needs Medusa heads and none were found" in output
    assert "$VLLM_MEDUSA_HEADS (not set)" in output
    assert f"{base}/medusa/ (missing)" in output
    assert "heads shipped with vllm-medusa (none for this model)" in output
    assert "vllm-medusa train" in output
    assert "Traceback" not in output


# -- the alias on `vllm serve`'s own parser (what GPU installs run) ---------------------------------
def _vllm_serve_parser():
    """`vllm serve`'s parser, built as vllm/entrypoints/cli/main.py builds it (that script cannot start
    on the CPU build: it asks for the metadata of a distribution named `vllm`)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    return parser


def test_vllm_serve_parser_maps_the_alias(oracle_heads):
    args = _vllm_serve_parser().parse_args(
        ["serve", "BASE", "--speculative-model", str(oracle_heads), "--num-speculative-tokens", "4"]
    )
    assert args.speculative_config == {"method": "medusa", "model": str(oracle_heads), "num_speculative_tokens": 4}


def test_vllm_serve_parser_rejects_alias_with_speculative_config(capsys):
    with pytest.raises(SystemExit) as caught:
        _vllm_serve_parser().parse_args(
            ["serve", "BASE", "--speculative-model", "medusa", "--speculative-config.method", "ngram"]
        )
    assert caught.value.code == 2
    assert capsys.readouterr().err == (
        "vllm serve: error: --speculative-model is an alias for --speculative-config; give one of them, "
        "not both (also given: --speculative-config)\n"
    )
