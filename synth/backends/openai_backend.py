"""Any OpenAI-compatible chat endpoint (``vllm serve``, hosted APIs).

Bounded concurrency, retries with exponential backoff on connection errors, timeouts, 429 and
5xx, and ``response_format`` JSON schemas. The API key comes from an environment variable and
is never logged or written to the manifest.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from synth.backends.base import Backend, BackendError, ChatRequest, Generation, missing_package

logger = logging.getLogger("synth.openai")


class OpenAIBackend(Backend):
    def __init__(self, model: str, base_url: str, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 max_retries: int = 5, backoff: float = 1.0, timeout: float = 120.0) -> None:
        super().__init__(model=model)
        if importlib.util.find_spec("openai") is None:
            raise missing_package("openai", "pip install openai")
        from openai import OpenAI

        key = os.environ.get(api_key_env) or "EMPTY"
        # The client's own retries are off: ours count attempts and back off visibly.
        self.client = OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=timeout)
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff = backoff
        self.info = {"base_url": base_url, "api_key_env": api_key_env, "concurrency": concurrency,
                     "max_retries": max_retries}

    def _one(self, request: ChatRequest) -> Generation:
        import openai

        kwargs = dict(model=self.model, messages=request.messages, max_tokens=request.max_tokens,
                      temperature=request.temperature, top_p=request.top_p, seed=request.seed)
        if request.schema is not None:
            kwargs["response_format"] = {"type": "json_schema",
                                         "json_schema": {"name": "record", "schema": request.schema, "strict": True}}
        last = None
        for attempt in range(1, self.max_retries + 2):
            try:
                response = self.client.chat.completions.create(**kwargs)
                choice = response.choices[0]
                usage = response.usage
                return Generation(choice.message.content or "", usage.prompt_tokens if usage else 0,
                                  usage.completion_tokens if usage else 0, choice.finish_reason or "stop",
                                  attempts=attempt)
            except (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError,
                    openai.InternalServerError) as err:
                last = err
                delay = self.backoff * 2 ** (attempt - 1)
                logger.warning("request failed (%s), attempt %d/%d; retrying in %.1fs", type(err).__name__, attempt,
                               self.max_retries + 1, delay)
                time.sleep(delay)
            except openai.APIStatusError as err:  # 4xx other than 429: not retryable
                return Generation("", 0, 0, "error", attempts=attempt, error=f"HTTP {err.status_code}")
        raise BackendError(f"endpoint {self.info['base_url']} unreachable after {self.max_retries + 1} attempts: "
                           f"{type(last).__name__}")

    def generate(self, requests: list[ChatRequest]) -> list[Generation]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._one, requests))
