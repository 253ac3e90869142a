"""`vllm-medusa serve` and the `--speculative-model` alias: argument mapping, without vLLM.

The parser here mimics the dests of vLLM 0.32's speculative flags; tests/vllm/test_server.py checks the
same alias on vLLM's real `vllm serve` parser and through a running server.
"""

from __future__ import annotations

import argparse
import json
import sys
from types import SimpleNamespace

import pytest

from vllm_medusa.serve import SERVER_MODULE, server_argv
from vllm_medusa.vllm.cli_alias import MODEL_DEST, TOKENS_DEST, add_alias_arguments, fold_alias
from vllm_medusa.vllm.patches import _fold_spec_flags
from vllm_medusa.vllm.settings import Acceptance, MedusaConfigError


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse like vLLM's server parser (its speculative flags) with the alias added, then fold."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--speculative-config", type=json.loads, default=None)
    for flag in ("--spec-method", "--spec-model", "--spec-tokens"):
        parser.add_argument(flag, default=None)
    add_alias_arguments(parser)
    namespace = parser.parse_args(argv)
    fold_alias(namespace)
    return namespace


# -- serve.py: the api_server command line -------------------------------------------------------
def test_base_model_becomes_model_option():
    command = server_argv(["BASE", "--port", "8000", "--speculative-model", "medusa"])
    assert command[0] == sys.executable
    assert command[command.index("-m") + 1] == SERVER_MODULE
    assert command[command.index(SERVER_MODULE) + 1 :] == [
        "--model", "BASE", "--port", "8000", "--speculative-model", "medusa"
    ]


def test_options_pass_through_unchanged():
    argv = ["--model", "BASE", "--speculative-config", '{"method": "medusa"}', "--help"]
    command = server_argv(argv)
    assert command[command.index(SERVER_MODULE) + 1 :] == argv


def test_only_the_server_modules_deprecation_warning_is_silenced():
    command = server_argv(["BASE"])
    assert command[command.index("-W") + 1] == "ignore::DeprecationWarning:__main__"


# -- the alias -------------------------------------------------------------------------------------
def test_bare_medusa_leaves_heads_to_discovery():
    namespace = _parse(["--speculative-model", "medusa"])
    assert namespace.speculative_config == {"method": "medusa"}
    assert not hasattr(namespace, MODEL_DEST) and not hasattr(namespace, TOKENS_DEST)


def test_heads_dir_and_token_count(tmp_path):
    namespace = _parse(["--speculative-model", str(tmp_path), "--num-speculative-tokens", "8"])
    assert namespace.speculative_config == {"method": "medusa", "model": str(tmp_path), "num_speculative_tokens": 8}


def test_without_alias_nothing_changes():
    namespace = _parse(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'])
    assert namespace.speculative_config == {"method": "ngram", "num_speculative_tokens": 3}
    assert _parse([]).speculative_config is None


@pytest.mark.parametrize("other", [["--speculative-config", '{"method": "medusa"}'], ["--spec-method", "medusa"],
                                   ["--spec-tokens", "4"]])
def test_alias_and_another_spelling_conflict(other):
    with pytest.raises(MedusaConfigError, match="alias for --speculative-config; give one of them, not both"):
        _parse(["--speculative-model", "medusa", *other])


def test_token_count_needs_the_alias():
    with pytest.raises(MedusaConfigError, match="--num-speculative-tokens goes with --speculative-model"):
        _parse(["--num-speculative-tokens", "4"])


def test_alias_value_must_be_medusa_or_a_directory(tmp_path):
    with pytest.raises(MedusaConfigError, match="takes `medusa` .* or a Medusa heads directory"):
        _parse(["--speculative-model", str(tmp_path / "missing")])


# -- vLLM's own short flags reach the heads discovery ---------------------------------------------
def _engine_args(**kwargs) -> SimpleNamespace:
    fields = dict(speculative_config=None, spec_method=None, spec_model=None, spec_tokens=None)
    return SimpleNamespace(**{**fields, **kwargs})


def test_spec_flags_fold_for_medusa():
    args = _engine_args(spec_method="medusa", spec_tokens=4)
    _fold_spec_flags(args)
    assert args.speculative_config == {"method": "medusa", "num_speculative_tokens": 4}
    assert args.spec_method is None and args.spec_tokens is None


def test_spec_flags_left_to_vllm_for_other_methods():
    args = _engine_args(spec_method="ngram", spec_tokens=4)
    _fold_spec_flags(args)
    assert args.speculative_config is None and args.spec_method == "ngram"


def test_spec_flag_given_twice_is_an_error():
    args = _engine_args(speculative_config={"method": "medusa", "model": "A"}, spec_model="B")
    with pytest.raises(MedusaConfigError, match="--spec-model and --speculative-config"):
        _fold_spec_flags(args)


# -- per-request options, checked in the front end ------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    ({"medusa_acceptance": "bogus"}, "unknown Medusa acceptance mode"),
    ({"typical_eps": "abc"}, "typical_eps must be a number"),
    ({"typical_delta": 2.0}, "typical_delta must be in"),
])
def test_bad_request_options_are_clear_errors(extra, message):
    with pytest.raises(MedusaConfigError, match=message):
        Acceptance().for_request(extra)


def test_request_options_override_the_default():
    chosen = Acceptance().for_request({"medusa_acceptance": "typical", "typical_eps": "0.2"})
    assert chosen == Acceptance(mode="typical", typical_eps=0.2)
