"""MT-Bench questions shipped as package data."""

from __future__ import annotations

from collections import Counter
from importlib import resources

import pytest

from vllm_medusa.mtbench import CATEGORIES, Question, load_mtbench


def test_all_80_questions_two_turns_each() -> None:
    questions = load_mtbench()
    assert [q.question_id for q in questions] == list(range(81, 161))
    assert Counter(q.category for q in questions) == {category: 10 for category in CATEGORIES}
    assert all(len(q.turns) == 2 and all(isinstance(t, str) and t.strip() for t in q.turns) for q in questions)


def test_filter_by_category_keeps_file_order() -> None:
    questions = load_mtbench(categories=["math", "coding"])
    assert len(questions) == 20
    assert {q.category for q in questions} == {"math", "coding"}
    assert [q.question_id for q in questions] == sorted(q.question_id for q in questions)


def test_limit_takes_the_first_questions() -> None:
    assert load_mtbench(limit=3) == load_mtbench()[:3]
    assert load_mtbench(categories=["stem"], limit=2) == load_mtbench(categories=["stem"])[:2]
    assert load_mtbench(limit=0) == []


def test_question_is_a_plain_record() -> None:
    first = load_mtbench(limit=1)[0]
    assert first == Question(81, "writing", first.turns)
    assert first.turns[0].startswith("Compose an engaging travel blog post")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"categories": ["poetry"]}, "unknown MT-Bench categories: poetry"), ({"limit": -1}, "limit must be >= 0")],
)
def test_bad_arguments_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_mtbench(**kwargs)


def test_attribution_ships_with_the_data() -> None:
    readme = resources.files("vllm_medusa").joinpath("data/README.md").read_text(encoding="utf-8")
    assert "FastChat" in readme and "Spec-Bench" in readme and "Apache-2.0" in readme
