"""EOS handling, truncation and prompt lengths with the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest

from llmembed.backbone import load_tokenizer
from llmembed.export import _serving_tokenizer
from llmembed.prompts import PromptConfig, PromptError
from llmembed.tokenization import EmbeddingTokenizer


@pytest.fixture(scope="module")
def tokenizer(default_dir):
    return load_tokenizer(str(default_dir))


def test_eos_appended_exactly_once(tokenizer):
    plain = tokenizer("hello world", add_special_tokens=True)["input_ids"]
    assert plain[-1] != tokenizer.eos_token_id  # SmolLM2's own call appends nothing
    tok = EmbeddingTokenizer(tokenizer, append_eos=True)
    assert tok.token_ids(["hello world"], 64) == [plain + [tokenizer.eos_token_id]]
    # A tokenizer that appends EOS by itself (the exported one) gets no second EOS.
    serving = _serving_tokenizer(tokenizer, append_eos=True)
    assert serving("hello world")["input_ids"] == plain + [tokenizer.eos_token_id]
    assert EmbeddingTokenizer(serving, append_eos=True).token_ids(["hello world"], 64) == [plain + [tokenizer.eos_token_id]]
    assert EmbeddingTokenizer(serving, append_eos=False).token_ids(["hello world"], 64) == [plain]


def test_truncation_keeps_eos_last(tokenizer):
    tok = EmbeddingTokenizer(tokenizer, append_eos=True)
    text = " ".join(["word"] * 100)
    (ids,) = tok.token_ids([text], 10)
    assert len(ids) == 10 and ids[-1] == tokenizer.eos_token_id
    assert ids[:9] == tokenizer(text)["input_ids"][:9]
    batch = tok([text, "a"], max_length=10)
    assert batch["input_ids"].shape == (2, 10)
    assert batch["attention_mask"].sum(1).tolist() == [10, 2]


def test_prompt_length_counts_prefix_tokens(tokenizer):
    prompts = PromptConfig()
    prefix = prompts.query_prefix("Find the answer")
    tok = EmbeddingTokenizer(tokenizer, append_eos=True)
    n = tok.prompt_length(prefix)
    assert n == len(tokenizer(prefix)["input_ids"])
    batch = tok([prefix + "what is up", "plain passage"], [prefix, ""], max_length=64)
    assert batch["prompt_lengths"].tolist() == [n, 0]


def test_templates_are_validated():
    with pytest.raises(PromptError, match="query_template"):
        PromptConfig(query_template="{text} Instruct: {instruction}")
    with pytest.raises(PromptError, match="instruction"):
        PromptConfig(query_template="Query: {text}")
    with pytest.raises(PromptError, match="passage_template"):
        PromptConfig(passage_template="{instruction} {text}")
    with pytest.raises(PromptError, match="unknown"):
        PromptConfig(query_template="{lang} {instruction}: {text}")
    p = PromptConfig(passage_template="passage: {text}")
    assert p.passage_prefix() == "passage: "
    assert p.query_prefix("X") == "Instruct: X\nQuery: "
