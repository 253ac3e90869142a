"""A tiny chat model for training tests: word-level tokenizer with a chat template, random 2-layer Llama.

The synthetic chats ask to "count from wK" and the answer counts on (wK w(K+1) ...), so the token k+1 steps
ahead of any answer token is fully determined by it: trained heads can reach high accuracy in seconds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

WORDS = [f"w{i}" for i in range(24)]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' + message['content'] + '<|im_end|> ' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}"
)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant",
                                                "system", "count", "from", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def counting_chat(rng: random.Random, turns: int = 1, length: int = 10) -> list[dict[str, str]]:
    messages = []
    for _ in range(turns):
        start = rng.randrange(len(WORDS))
        messages.append({"role": "user", "content": f"count from {WORDS[start]}"})
        answer = " ".join(WORDS[(start + i) % len(WORDS)] for i in range(length))
        messages.append({"role": "assistant", "content": answer})
    return messages


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    directory = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A distill-style output directory: train.jsonl (200 chats) and heldout.jsonl (40 chats)."""
    rng = random.Random(0)
    directory = tmp_path_factory.mktemp("tiny-data")
    for name, count in (("train.jsonl", 200), ("heldout.jsonl", 40)):
        with (directory / name).open("w") as handle:
            for i in range(count):
                record = {"id": f"{name}-{i}", "messages": counting_chat(rng, turns=1 + i % 2)}
                handle.write(json.dumps(record) + "\n")
    return directory
