"""Batched ``generate`` from transformers, constrained to the request's JSON schema by xgrammar.

For CPUs and small GPUs, and the default (SmolLM2-135M-Instruct on CPU). Constrained decoding
masks every token that would break the schema, so even a small or random model yields
parseable JSON. Sampling is seeded per batch from the requests' seeds, so the same work items
give the same outputs again.
"""

from __future__ import annotations

import importlib.util
import json

import torch

from synth.backends.base import Backend, BackendError, ChatRequest, Generation, missing_package, model_path


class TransformersBackend(Backend):
    def __init__(self, model: str = "default", batch_size: int = 8, constrained: bool = True,
                 dtype: str = "auto", trust_remote_code: bool = False) -> None:
        super().__init__(model=model)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if constrained and importlib.util.find_spec("xgrammar") is None:
            raise missing_package("xgrammar", "pip install xgrammar")
        path = model_path(model)
        torch_dtype = torch.float32
        if dtype == "bfloat16" or (dtype == "auto" and torch.cuda.is_available()):
            torch_dtype = torch.bfloat16
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            self.lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        except OSError as err:
            raise BackendError(f"cannot load model {model!r}: {err}") from err
        self.lm.eval()
        if torch.cuda.is_available():
            self.lm.to("cuda")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.batch_size = batch_size
        self.constrained = constrained
        self._compiler = None
        self._grammars: dict[str, object] = {}
        self.info = {"batch_size": batch_size, "constrained": constrained, "dtype": str(torch_dtype)}

    def _grammar(self, schema: dict):
        import xgrammar as xgr

        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.lm.config.vocab_size)
            self._compiler = xgr.GrammarCompiler(info)
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            # No free whitespace between JSON tokens: a small model cannot waste its budget on it.
            self._grammars[key] = self._compiler.compile_json_schema(key, any_whitespace=False)
        return self._grammars[key]

    def generate(self, requests: list[ChatRequest]) -> list[Generation]:
        out: list[Generation] = []
        for start in range(0, len(requests), self.batch_size):
            out += self._batch(requests[start : start + self.batch_size])
        return out

    @torch.no_grad()
    def _batch(self, requests: list[ChatRequest]) -> list[Generation]:
        prompts = [self.tokenizer.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True)
                   for r in requests]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.lm.device)
        processors = []
        if self.constrained and all(r.schema is not None for r in requests):
            import xgrammar as xgr

            processors.append(xgr.contrib.hf.LogitsProcessor([self._grammar(r.schema) for r in requests]))
        first = requests[0]
        generator_seed = hash(tuple(r.seed for r in requests)) & 0x7FFFFFFF
        torch.manual_seed(generator_seed)
        sample = first.temperature > 0
        kwargs = dict(do_sample=sample, max_new_tokens=max(r.max_tokens for r in requests),
                      pad_token_id=self.tokenizer.pad_token_id, logits_processor=processors or None)
        if sample:
            kwargs.update(temperature=first.temperature, top_p=first.top_p, top_k=0)
        sequences = self.lm.generate(**enc, **kwargs)
        new = sequences[:, enc["input_ids"].shape[1]:]
        results = []
        eos = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        for i, row in enumerate(new.tolist()):
            limit = requests[i].max_tokens
            kept = []
            for token in row[:limit]:
                if token in eos:
                    break
                kept.append(token)
            finished = len(kept) < len(row[:limit]) or len(kept) < limit
            text = self.tokenizer.decode(kept, skip_special_tokens=True)
            results.append(Generation(text, int(enc["attention_mask"][i].sum()), len(kept),
                                      "stop" if finished else "length"))
        return results
