"""Turn formatted texts into model inputs the same way everywhere.

One job: given texts and their prompt prefixes, produce ``input_ids``, ``attention_mask`` and
``prompt_lengths``. EOS is appended by this code, not by trusting a tokenizer flag (tokenizers
disagree on ``add_eos_token``; servers call the tokenizer plainly). If the tokenizer already
appends EOS itself (an exported folder does), we do not append a second one.

``prompt_lengths`` counts the prefix's tokens the way sentence-transformers does (tokenise the
prefix alone, drop a trailing special token), so that instruction exclusion in mean and
latent-attention pooling gives the same vectors in training, ``encode`` and the export.
"""

from __future__ import annotations

from typing import Sequence

import torch


class EmbeddingTokenizer:
    def __init__(self, tokenizer, append_eos: bool, padding_side: str = "right") -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.tokenizer = tokenizer
        self.append_eos = append_eos
        self.padding_side = padding_side
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.tokenizer_appends_eos = len(probe) > 0 and probe[-1] == self.eos_id
        self._prefix_cache: dict[str, int] = {}

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

    def token_ids(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        """Token ids of already-formatted texts, EOS handled, each at most ``max_length`` long."""
        # Room for an EOS the tokenizer appends itself; it is stripped and re-added below.
        limit = max_length + (1 if self.tokenizer_appends_eos else 0)
        encoded = self.tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=limit)["input_ids"]
        rows = []
        for ids in encoded:
            if self.tokenizer_appends_eos:
                ids = ids[:-1]
            rows.append(ids[: max_length - 1] + [self.eos_id] if self.append_eos else ids[:max_length])
        return rows

    def __call__(
        self, texts: Sequence[str], prefixes: Sequence[str] | None = None, max_length: int = 512
    ) -> dict[str, torch.Tensor]:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        rows = self.token_ids(texts, max_length)
        longest = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(longest - len(row), longest) if self.padding_side == "left" else slice(0, len(row))
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, span] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if prefixes is not None:
            batch["prompt_lengths"] = torch.tensor([self.prompt_length(p) for p in prefixes], dtype=torch.long)
        return batch
