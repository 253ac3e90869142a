"""MT-Bench questions shipped with the package, for acceptance-length and speed benchmarks (never training)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")


@dataclass(frozen=True)
class Question:
    """One MT-Bench question: two user turns (the second follows up on the answer to the first)."""

    question_id: int
    category: str
    turns: tuple[str, ...]


def load_mtbench(categories: Iterable[str] | None = None, limit: int | None = None) -> list[Question]:
    """The 80 questions (ids 81-160) in file order, optionally only some categories and the first `limit`."""
    wanted = None if categories is None else set(categories)
    if wanted is not None and not wanted <= set(CATEGORIES):
        unknown = ", ".join(sorted(wanted - set(CATEGORIES)))
        raise ValueError(f"unknown MT-Bench categories: {unknown}; choose from {', '.join(CATEGORIES)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    text = resources.files("vllm_medusa").joinpath("data/mt_bench_questions.jsonl").read_text(encoding="utf-8")
    questions = [_question(json.loads(line)) for line in text.splitlines() if line.strip()]
    selected = [q for q in questions if wanted is None or q.category in wanted]
    return selected if limit is None else selected[:limit]


def chat_prompts(model_dir: str | Path, count: int) -> list[str]:
    """The first `count` first turns as prompt strings, in the model's chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q.turns[0]}], tokenize=False,
                                      add_generation_prompt=True)
        for q in load_mtbench(limit=count)
    ]


def _question(record: dict) -> Question:
    return Question(int(record["question_id"]), str(record["category"]), tuple(record["turns"]))
