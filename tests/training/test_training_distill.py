"""Self-distillation: turn-by-turn replay, the split, resumption and determinism (with a fake model)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vllm_medusa.training.data import Conversation, read_jsonl
from vllm_medusa.training.distill import distill, request_seed, select

from .conftest import tiny_tokenizer


class EchoBackend:
    """Answers "<seed> saw <last user message>", so tests can see seeds and the history sent."""

    def __init__(self) -> None:
        self.tokenizer = tiny_tokenizer()
        self.calls: list[list[list[dict[str, str]]]] = []

    def generate(self, chats, seeds, temperature):
        self.calls.append([list(chat) for chat in chats])  # replay extends the lists later
        return [(f"{seed} saw {chat[-1]['content']} t={temperature}", True) for chat, seed in zip(chats, seeds)]


def options(**overrides) -> argparse.Namespace:
    values = dict(seed=3, heldout_fraction=0.25, temperature=0.3, heldout_temperature=0.0, max_turns=2,
                  max_prompt_tokens=40, chunk_size=4)
    return argparse.Namespace(**{**values, **overrides})


CONVERSATIONS = [Conversation(f"c{i}", ("count from w1", "count from w2", "count from w3")) for i in range(12)]


def test_replays_turns_with_own_answers_and_keeps_heldout_apart(tmp_path: Path) -> None:
    backend = EchoBackend()
    counts = distill(backend, CONVERSATIONS, tmp_path, options())
    train, heldout = read_jsonl(tmp_path / "train.jsonl"), read_jsonl(tmp_path / "heldout.jsonl")
    assert counts["train"] == len(train) and counts["heldout"] == len(heldout) and len(train) + len(heldout) == 12
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in heldout)
    record = train[0]
    roles = [m["role"] for m in record["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]  # max_turns=2
    first_answer = record["messages"][1]["content"]
    assert first_answer == f"{request_seed(3, record['id'], 0)} saw count from w1 t=0.3"
    assert all(r["messages"][1]["content"].endswith("t=0.0") for r in heldout)  # greedy held-out answers
    # the second turn was generated with the model's own first answer in its history
    second_turn_chats = [chat for call in backend.calls for chat in call if len(chat) == 3]
    assert any(chat[1]["content"] == first_answer for chat in second_turn_chats)


def test_resume_skips_written_conversations_and_matches_a_full_run(tmp_path: Path) -> None:
    full = tmp_path / "full"
    distill(EchoBackend(), CONVERSATIONS, full, options())
    part = tmp_path / "part"
    distill(EchoBackend(), CONVERSATIONS[:5], part, options())
    backend = EchoBackend()
    counts = distill(backend, CONVERSATIONS, part, options())
    assert counts["resumed"] == 5 and counts["train"] + counts["heldout"] == 7
    for name in ("train.jsonl", "heldout.jsonl"):
        by_id = lambda rows: sorted(rows, key=lambda r: r["id"])  # noqa: E731
        assert by_id(read_jsonl(part / name)) == by_id(read_jsonl(full / name))


def test_long_prompts_stop_the_conversation(tmp_path: Path) -> None:
    long = Conversation("long", ("count " * 50,))
    stops = Conversation("stops", ("count from w1", "count " * 50))
    counts = distill(EchoBackend(), [long, stops], tmp_path, options(heldout_fraction=0.0))
    (record,) = read_jsonl(tmp_path / "train.jsonl")
    assert counts["skipped"] == 1 and record["id"] == "stops" and len(record["messages"]) == 2


def test_select_is_seeded() -> None:
    assert select(CONVERSATIONS, 5, seed=1) == select(CONVERSATIONS, 5, seed=1) != select(CONVERSATIONS, 5, seed=2)
    assert select(CONVERSATIONS, 0, seed=1) == CONVERSATIONS
