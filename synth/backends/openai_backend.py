"""Any OpenAI-compatible chat endpoint (``vllm serve``, hosted APIs).

Bounded concurrency, timeouts and ``response_format`` JSON schemas. Retries are the OpenAI
client's own (``max_retries``): exponential backoff with jitter on connection errors,
timeouts, 408/409/429 and 5xx, honouring a server's ``retry-after(-ms)``, and no sleep after the
last failure. The API key comes from an environment variable and is never logged or written to
the manifest; credentials in the URL itself (user info, query-string values) are blanked in
everything printed or written.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from concurrent.futures import ThreadPoolExecutor

from synth.backends.base import Backend, BackendError, ChatRequest, Generation, missing_package

logger = logging.getLogger("synth.openai")


def _attempts(err: Exception) -> int:
    """Requests the client sent for a failed call: it stamps every request with its retry count
    (``x-stainless-retry-count``), which we read back from the last request."""
    request = getattr(err, "request", None)
    try:
        return int(request.headers.get("x-stainless-retry-count", "0")) + 1
    except (AttributeError, ValueError):
        return 1


def redact_url(url: str) -> str:
    """``url`` fit to print or write: a user name and password (``http://user:pw@host``) and
    every query-string value (tokens are often passed that way) replaced by ``***``."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "***"  # not even a URL: print none of it
    netloc = ("***@" if "@" in parts.netloc else "") + (f"[{host}]" if ":" in host else host) + port
    query = urlencode([(name, "***") for name, _ in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


class OpenAIBackend(Backend):
    def __init__(self, model: str, base_url: str, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 max_retries: int = 5, timeout: float = 120.0) -> None:
        super().__init__(model=model)
        if importlib.util.find_spec("openai") is None:
            raise missing_package("openai", "pip install openai")
        from openai import OpenAI

        key = os.environ.get(api_key_env) or "EMPTY"
        self.client = OpenAI(base_url=base_url, api_key=key, max_retries=max_retries, timeout=timeout)
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.info = {"base_url": redact_url(base_url), "api_key_env": api_key_env, "concurrency": concurrency,
                     "max_retries": max_retries}

    def _one(self, request: ChatRequest) -> Generation:
        import openai

        kwargs = dict(model=self.model, max_tokens=request.max_tokens, temperature=request.temperature,
                      top_p=request.top_p, seed=request.seed)
        if request.stop:
            kwargs["stop"] = list(request.stop)
        if request.schema is not None:
            kwargs["response_format"] = {"type": "json_schema",
                                         "json_schema": {"name": "record", "schema": request.schema, "strict": True}}
        # A plain prompt goes to the completions endpoint, chat messages to chat completions.
        endpoint = self.client.completions if request.prompt is not None else self.client.chat.completions
        kwargs.update(prompt=request.prompt) if request.prompt is not None else kwargs.update(messages=request.messages)
        try:
            raw = endpoint.with_raw_response.create(**kwargs)
        except openai.APIStatusError as err:
            status = err.status_code
            if status in (408, 409, 429) or status >= 500:  # retryable: the client gave up
                raise BackendError(f"endpoint {self.info['base_url']} failed after {_attempts(err)} attempts: "
                                   f"HTTP {status} ({type(err).__name__})") from None
            # Any other 4xx (bad key, unknown model, bad request) is not fixed by retrying.
            return Generation("", 0, 0, "error", attempts=_attempts(err), error=f"HTTP {status}")
        except openai.APIConnectionError as err:  # includes timeouts
            raise BackendError(f"endpoint {self.info['base_url']} unreachable after {_attempts(err)} attempts: "
                               f"{type(err).__name__}") from None
        if raw.retries_taken:
            logger.warning("request succeeded after %d retries", raw.retries_taken)
        response = raw.parse()
        choice = response.choices[0]
        usage = response.usage
        text = choice.text if request.prompt is not None else choice.message.content
        return Generation(text or "", usage.prompt_tokens if usage else 0,
                          usage.completion_tokens if usage else 0, choice.finish_reason or "stop",
                          attempts=raw.retries_taken + 1)

    def generate(self, requests: list[ChatRequest]) -> list[Generation]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._one, requests))
