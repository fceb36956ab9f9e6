"""Turn raw texts into model inputs the same way everywhere.

One job: given texts (and, for queries, an instruction), produce ``input_ids``,
``attention_mask`` and ``prompt_lengths`` by the rules of a :class:`ServingContract`. The
training collator, :meth:`EmbeddingModel.encode`, the export's checks and ``llmembed.serve.verify``
all go through :class:`EmbeddingTokenizer`, so the tokens a model was trained on are the
tokens it is served with.

- Prompts: queries get the contract's query prefix (``Instruct: ...\\nQuery: ``), passages
  its passage prefix (none by default). Prefixes are plain text in front of the text, which is
  exactly what sentence-transformers' prompts and a server's plain-text input reproduce.
- EOS is appended by this code, not by trusting a tokenizer flag (tokenizers disagree on
  ``add_eos_token``; servers call the tokenizer plainly). If the tokenizer already appends EOS
  (an exported folder's does), no second one is added.
- Truncation keeps the start of a text and its EOS, as a tokenizer that appends EOS in its
  post-processor does under ``truncation=True``.
- ``prompt_lengths`` counts the prefix's tokens the way sentence-transformers does (the prefix
  tokenised alone, a trailing special token dropped), so instruction exclusion in mean and
  latent-attention pooling gives the same vectors in training, ``encode`` and the export.
"""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

import torch

from llmembed.serving import ServingContract

Instructions = str | Sequence[str | None] | None


class EmbeddingTokenizer:
    def __init__(self, tokenizer, contract: ServingContract) -> None:
        self.tokenizer = tokenizer
        self.contract = contract
        self.append_eos = contract.append_eos
        self.padding_side = contract.padding_side
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.tokenizer_appends_eos = len(probe) > 0 and probe[-1] == self.eos_id
        self._prefix_cache: dict[str, int] = {}

    # ------------------------------------------------------------------ text
    def format(self, texts: Sequence[str], instruction: Instructions, is_query: bool) -> tuple[list[str], list[str]]:
        """Prompted texts and their prefixes. ``instruction`` is one string for all texts, one
        per text (mixed-task batches), or None (the default instruction for queries)."""
        if instruction is None or isinstance(instruction, str):
            prefix = self.contract.query_prefix(instruction) if is_query else self.contract.passage_prefix()
            return [prefix + t for t in texts], [prefix] * len(texts)
        if len(instruction) != len(texts):
            raise ValueError(f"{len(instruction)} instructions for {len(texts)} texts")
        if not is_query:
            raise ValueError("per-text instructions apply to queries only")
        prefixes = [self.contract.query_prefix(i) for i in instruction]
        return [p + t for p, t in zip(prefixes, texts)], prefixes

    # ------------------------------------------------------------------ tokens
    def prompt_length(self, prefix: str) -> int:
        """Tokens taken by ``prefix`` at the start of a text (BOS included, trailing EOS not)."""
        if not prefix:
            return 0
        if prefix not in self._prefix_cache:
            ids = self.tokenizer(prefix, add_special_tokens=True)["input_ids"]
            if ids and ids[-1] in self.tokenizer.all_special_ids:
                ids = ids[:-1]
            self._prefix_cache[prefix] = len(ids)
        return self._prefix_cache[prefix]

    def counting_fingerprint(self) -> str:
        """Names how :meth:`count_tokens` splits text (the tokenizer's full serialised form, or
        its vocabulary for a tokenizer without one): counts cached under it stay valid exactly
        as long as it does."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        text = backend.to_str() if backend is not None else json.dumps(sorted(self.tokenizer.get_vocab().items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each raw text, without prompts or special tokens (for grouping by length)."""
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def token_ids(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """Token ids of already-formatted texts, EOS handled, each at most ``max_length``
        (default: the contract's serving length) long."""
        max_length = self.contract.max_length if max_length is None else max_length
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        # Room for an EOS the tokenizer appends itself; it is stripped and re-added below.
        limit = max_length + (1 if self.tokenizer_appends_eos else 0)
        encoded = self.tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=limit)["input_ids"]
        rows = []
        for ids in encoded:
            if self.tokenizer_appends_eos:
                ids = ids[:-1]
            rows.append(ids[: max_length - 1] + [self.eos_id] if self.append_eos else ids[:max_length])
        return rows

    def pad(self, rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        longest = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(longest - len(row), longest) if self.padding_side == "left" else slice(0, len(row))
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, span] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def __call__(self, texts: Sequence[str], instruction: Instructions = None, *, is_query: bool | None = None,
                 max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Model inputs for raw texts: prompt, tokens, EOS, padding, prompt lengths.

        ``is_query`` defaults to "an instruction was given"; ``max_length`` to the serving length.
        """
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        if not texts:
            raise ValueError("no texts to tokenize")
        is_query = instruction is not None if is_query is None else is_query
        formatted, prefixes = self.format(texts, instruction, is_query)
        batch = self.pad(self.token_ids(formatted, max_length))
        batch["prompt_lengths"] = torch.tensor([self.prompt_length(p) for p in prefixes], dtype=torch.long)
        return batch
