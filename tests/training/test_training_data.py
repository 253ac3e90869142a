"""Prompt loading (ShareGPT, truncated files, JSONL), the MT-Bench guard, the split and chat labels."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from vllm_medusa.training.data import (
    IGNORE_INDEX,
    Conversation,
    assert_no_eval_overlap,
    encode_chat,
    eval_prompts,
    find_split,
    is_heldout,
    load_conversations,
    read_jsonl,
)

from .conftest import tiny_tokenizer

SHAREGPT = [
    {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                                  {"from": "human", "value": "more"}]},
    {"id": "b", "conversations": [{"from": "gpt", "value": "leading answer"}, {"from": "human", "value": "q"}]},
    {"id": "c", "conversations": []},
]


def test_sharegpt_json_with_truncated_tail(tmp_path: Path) -> None:
    text = json.dumps(SHAREGPT, indent=1)
    path = tmp_path / "cut.json"
    path.write_text(text[:-1] + ',\n {"id": "d", "conversations": [{"from": "human", "value": "unfini')
    conversations = load_conversations(path)
    assert conversations == [Conversation("a", ("hi", "more")), Conversation("b", ("q",))]


def test_jsonl_messages_and_line_separators_inside_strings(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    records = [{"id": 1, "messages": [{"role": "user", "content": "x\u2028y"}]}, {"id": 2, "turns": ["t1", "t2"]}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n")
    assert load_conversations(path) == [Conversation("1", ("x\u2028y",)), Conversation("2", ("t1", "t2"))]


def test_gzipped_splits_are_found_and_read(tmp_path: Path) -> None:
    records = [{"id": "x", "messages": [{"role": "user", "content": "hi"}]}]
    (tmp_path / "heldout.jsonl.gz").write_bytes(gzip.compress(json.dumps(records[0]).encode() + b"\n"))
    assert find_split(tmp_path, "train.jsonl") is None
    assert read_jsonl(find_split(tmp_path, "heldout.jsonl")) == records


def test_mt_bench_prompts_are_dropped_and_guarded(tmp_path: Path) -> None:
    mt_turn = sorted(eval_prompts())[0]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "leak", "turns": ["ok", "  " + mt_turn + " "]}) + "\n"
                    + json.dumps({"id": "fine", "turns": ["ok"]}) + "\n")
    assert [c.id for c in load_conversations(path)] == ["fine"]
    with pytest.raises(ValueError, match="MT-Bench"):
        assert_no_eval_overlap([Conversation("leak", (mt_turn,))])


def test_heldout_split_is_a_stable_hash() -> None:
    ids = [f"id{i}" for i in range(2000)]
    held = [i for i in ids if is_heldout(i, seed=0, fraction=0.1)]
    assert held == [i for i in reversed(ids) if is_heldout(i, 0, 0.1)][::-1]
    assert 150 < len(held) < 250
    assert held != [i for i in ids if is_heldout(i, seed=1, fraction=0.1)]


def test_labels_cover_exactly_the_answers() -> None:
    tokenizer = tiny_tokenizer()
    chat = [{"role": "user", "content": "count from w1"}, {"role": "assistant", "content": "w1 w2"},
            {"role": "user", "content": "count from w5"}, {"role": "assistant", "content": "w5"}]
    ids, labels = encode_chat(tokenizer, chat, max_len=100)
    assert ids == tokenizer.apply_chat_template(chat, return_dict=True)["input_ids"]
    answer_tokens = [tokenizer.convert_ids_to_tokens(i) for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert answer_tokens == ["w1", "w2", "<|im_end|>", "w5", "<|im_end|>"]
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))
    assert encode_chat(tokenizer, chat, max_len=5) == (ids[:5], labels[:5])
