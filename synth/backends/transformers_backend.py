"""Batched ``generate`` from transformers, constrained to the request's JSON schema by xgrammar,
and batched scoring of given continuations (one forward pass each; the vocabulary projection
only at the scored positions, which on CPU is most of the cost of a full-logits forward).

For CPUs and small GPUs, and the default (SmolLM2-135M-Instruct on CPU). Constrained decoding
masks every token that would break the schema, so even a small or random model yields
parseable JSON. Sampling is seeded per batch from the requests' seeds, so the same work items
give the same outputs again.
"""

from __future__ import annotations

import importlib.util
import json

import torch

from synth.backends.base import (Backend, BackendError, ChatRequest, Generation, ScoreRequest, cut_at_stop,
                                 missing_package, model_path)


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
        plain = {r.prompt is not None for r in requests}
        if len(plain) > 1:
            raise BackendError("a batch mixes chat and plain prompts")
        if plain == {True}:  # a completion prompt is tokenised as is, with the tokenizer's BOS if it has one
            enc = self.tokenizer([r.prompt for r in requests], return_tensors="pt", padding=True)
        else:
            prompts = [self.tokenizer.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True)
                       for r in requests]
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(self.lm.device)
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
        stops = sorted({s for r in requests for s in r.stop})
        if stops:  # each row stops at its first stop string; the batch ends when all have
            kwargs.update(stop_strings=stops, tokenizer=self.tokenizer)
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
            text, stopped = cut_at_stop(self.tokenizer.decode(kept, skip_special_tokens=True), requests[i].stop)
            results.append(Generation(text, int(enc["attention_mask"][i].sum()), len(kept),
                                      "stop" if finished or stopped else "length"))
        return results

    @torch.no_grad()
    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        """Requests that feed the model the same tokens (context plus all but the last target
        token: a yes/no pair on one context) share one forward pass; inputs run sorted by length,
        ``batch_size`` at a time, right-padded, so padding changes nothing before it."""
        inputs: dict[tuple[int, ...], list[int]] = {}
        for number, r in enumerate(requests):
            if not r.context_ids or not r.target_ids:
                raise ValueError("a score request needs a non-empty context and target")
            inputs.setdefault(r.context_ids + r.target_ids[:-1], []).append(number)
        results: list[list[float]] = [[] for _ in requests]
        ordered = sorted(inputs, key=len)
        pad = self.tokenizer.pad_token_id
        decoder, head = self.lm.base_model, self.lm.get_output_embeddings()
        cap = getattr(self.lm.config, "final_logit_softcapping", None)
        for start in range(0, len(ordered), self.batch_size):
            batch = ordered[start : start + self.batch_size]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            hidden = decoder(input_ids=ids.to(self.lm.device), attention_mask=mask.to(self.lm.device)).last_hidden_state
            for row, seq in enumerate(batch):
                for number in inputs[seq]:
                    r = requests[number]
                    first = len(r.context_ids) - 1  # the position that predicts the first target token
                    logits = head(hidden[row, first : first + len(r.target_ids)]).double()
                    if cap:
                        logits = torch.tanh(logits / cap) * cap
                    logprobs = torch.log_softmax(logits, dim=-1)
                    targets = torch.tensor(r.target_ids, device=logprobs.device)
                    results[number] = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        return results
