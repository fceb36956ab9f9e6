"""EOS handling, truncation and prompt lengths with the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest

from llmembed.backbone import load_tokenizer
from llmembed.serve.export import serving_tokenizer
from llmembed.prompts import PromptConfig, PromptError
from llmembed.serving import ServingContract
from llmembed.tokenization import EmbeddingTokenizer

EOS = ServingContract(append_eos=True, max_length=64)
NO_EOS = ServingContract(append_eos=False, max_length=64)


@pytest.fixture(scope="module")
def tokenizer(default_dir):
    return load_tokenizer(str(default_dir))


def test_eos_appended_exactly_once(tokenizer):
    plain = tokenizer("hello world", add_special_tokens=True)["input_ids"]
    assert plain[-1] != tokenizer.eos_token_id  # SmolLM2's own call appends nothing
    tok = EmbeddingTokenizer(tokenizer, EOS)
    assert tok.token_ids(["hello world"], 64) == [plain + [tokenizer.eos_token_id]]
    # A tokenizer that appends EOS by itself (the exported one) gets no second EOS.
    serving = serving_tokenizer(tokenizer, EOS)
    assert serving("hello world")["input_ids"] == plain + [tokenizer.eos_token_id]
    assert EmbeddingTokenizer(serving, EOS).token_ids(["hello world"], 64) == [plain + [tokenizer.eos_token_id]]
    assert EmbeddingTokenizer(serving, NO_EOS).token_ids(["hello world"], 64) == [plain]


def test_truncation_keeps_eos_last(tokenizer):
    tok = EmbeddingTokenizer(tokenizer, EOS)
    text = " ".join(["word"] * 100)
    (ids,) = tok.token_ids([text], 10)
    assert len(ids) == 10 and ids[-1] == tokenizer.eos_token_id
    assert ids[:9] == tokenizer(text)["input_ids"][:9]
    batch = tok([text, "a"], max_length=10)
    assert batch["input_ids"].shape == (2, 10)
    assert batch["attention_mask"].sum(1).tolist() == [10, 2]
    # Without max_length the serving length applies: the contract's 64.
    assert tok([text])["attention_mask"].sum().item() == 64


def test_serving_tokenizer_cuts_like_ours_at_the_serving_length(tokenizer):
    """A server's plain, truncating call on the exported tokenizer gives our ids, long texts
    included: the first max_length - 1 tokens, then EOS."""
    serving = serving_tokenizer(tokenizer, EOS)
    ours = EmbeddingTokenizer(tokenizer, EOS)
    texts = ["short", " ".join(f"word{i}" for i in range(200)), "数字 123 🍕", "  spaced \n"]
    assert serving.model_max_length == 64
    assert [serving(t, truncation=True)["input_ids"] for t in texts] == ours.token_ids(texts)
    assert [len(ids) for ids in ours.token_ids(texts)][1] == 64

def test_prompt_length_counts_prefix_tokens(tokenizer):
    prompts = PromptConfig()
    prefix = prompts.query_prefix("Find the answer")
    tok = EmbeddingTokenizer(tokenizer, ServingContract(prompts=prompts))
    n = tok.prompt_length(prefix)
    assert n == len(tokenizer(prefix)["input_ids"])
    queries = tok(["what is up", "hello"], ["Find the answer", "Other task"], is_query=True)
    assert queries["prompt_lengths"][0].item() == n
    assert queries["prompt_lengths"][1].item() == tok.prompt_length(prompts.query_prefix("Other task"))
    assert tokenizer.decode(queries["input_ids"][0][queries["attention_mask"][0].bool()]) == (
        prefix + "what is up" + tokenizer.eos_token)
    assert tok(["plain passage"])["prompt_lengths"].tolist() == [0]


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
