"""Our encoders as mteb 2.x models: ``mteb.evaluate(MTEBEncoder(encoder), tasks)``.

An :class:`mteb.models.abs_encoder.AbsEncoder` over :class:`llmembed.serve.encoders.TextEncoder`:
queries (and both sides of symmetric tasks such as STS and classification) get the task's
instruction, documents get none (E5 convention). Instructions come from ``instructions``
(task name -> text, or query text -> text for records that carry their own; the offline suite
declares its own) and fall back to the model's default.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

from llmembed.serve.encoders import TextEncoder
from llmembed.evaluate.suite import Instruction


class MTEBEncoder(AbsEncoder):
    def __init__(self, encoder: TextEncoder, instructions: dict[str, Instruction] | None = None) -> None:
        self.encoder = encoder
        self.instructions = dict(instructions or {})  # task -> Instruction (see suite.py)
        self.mteb_model_meta = ModelMeta.create_empty(overwrites=dict(
            name=f"llmembed/{encoder.name}", revision=encoder.fingerprint[:12], embed_dim=encoder.dim,
            similarity_fn_name=ScoringFunction.COSINE, use_instructions=encoder.takes_instructions,
            framework=["PyTorch"], open_weights=True,
        ))

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type: PromptType | None = None,
               **kwargs: Any) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        # STS pairs repeat their texts (Lee: 50 documents in 2,450 slots): encode each once.
        unique = list(dict.fromkeys(texts))
        if prompt_type == PromptType.document:
            vectors = self.encoder.encode_passages(unique)
        else:
            instruction = self.instructions.get(task_metadata.name)
            if isinstance(instruction, dict):  # records with their own instructions
                instruction = [instruction.get(text) for text in unique]
            vectors = self.encoder.encode_queries(unique, instruction)
        row = {text: i for i, text in enumerate(unique)}
        return vectors[[row[t] for t in texts]]
