"""The OpenAI backend against a real local HTTP server (stdlib ``http.server`` on loopback): the
client's own retries, attempts counted, no sleep after the last failure, 4xx not retried, the
API key sent but never logged; answers of an unconstrained endpoint checked against the schema
they were requested with."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("openai")

from synth.backends import BackendError, ChatRequest
from synth.backends.openai_backend import OpenAIBackend

SECRET = "sk-synth-unit-3c9e1a"
ANSWER = {"S1": "A cat sits on a mat.", "S2": "A cat is sitting on a rug.", "S3": "A dog runs in a park."}


class Endpoint(ThreadingHTTPServer):
    """``/v1/chat/completions`` that answers ``fail_status`` to the first ``failures`` requests
    (with a ``retry-after-ms`` header, which the client honours instead of its own backoff),
    then chat completions whose contents are ``answers`` in turn. Records the arrival time,
    headers and body of every request."""

    daemon_threads = True

    def __init__(self, failures: int, fail_status: int = 500, retry_after_ms: int | None = None,
                 answers: list[str] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.failures = failures
        self.fail_status = fail_status
        self.retry_after_ms = retry_after_ms
        self.answers = answers or [json.dumps(ANSWER)]
        self.arrivals: list[float] = []
        self.headers: list[dict] = []
        self.bodies: list[dict] = []
        self.paths: list[str] = []
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    server: Endpoint

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.arrivals.append(time.monotonic())
            self.server.headers.append({k.lower(): v for k, v in self.headers.items()})
            self.server.bodies.append(body)
            self.server.paths.append(self.path)
            failing = len(self.server.arrivals) <= self.server.failures
            answer = self.server.answers[(len(self.server.arrivals) - 1) % len(self.server.answers)]
        if self.path not in ("/v1/chat/completions", "/v1/completions"):
            return self._send(404, {"error": {"message": "not found"}})
        if failing:
            extra = {} if self.server.retry_after_ms is None else {"retry-after-ms": str(self.server.retry_after_ms)}
            return self._send(self.server.fail_status, {"error": {"message": "try again"}}, extra)
        if self.path == "/v1/completions":  # a plain prompt: the text continues it
            return self._send(200, {
                "id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "text": answer, "logprobs": None}],
                "usage": {"prompt_tokens": 50, "completion_tokens": 6, "total_tokens": 56},
            })
        assert body["response_format"]["type"] == "json_schema"
        self._send(200, {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": answer}}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 29, "total_tokens": 40},
        })

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:  # keep test output quiet
        pass


@pytest.fixture
def serve() -> Iterator:
    servers: list[Endpoint] = []

    def start(failures: int, **kwargs) -> Endpoint:
        server = Endpoint(failures, **kwargs)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _backend(server: Endpoint, monkeypatch, max_retries: int) -> OpenAIBackend:
    monkeypatch.setenv("SYNTH_UNIT_KEY", SECRET)
    return OpenAIBackend("served-model", server.base_url, api_key_env="SYNTH_UNIT_KEY", concurrency=2,
                         max_retries=max_retries, timeout=10.0)


def _request() -> ChatRequest:
    from synth.prompts import example_schema

    return ChatRequest([{"role": "user", "content": "three sentences"}], example_schema("sts"), seed=1)


def test_two_server_errors_then_an_answer(serve, monkeypatch, caplog):
    server = serve(2, retry_after_ms=20)
    caplog.set_level(logging.DEBUG)
    [gen] = _backend(server, monkeypatch, max_retries=3).generate([_request()])
    assert len(server.arrivals) == 3
    assert gen.attempts == 3 and gen.error is None
    assert json.loads(gen.text) == ANSWER and (gen.tokens_in, gen.tokens_out) == (11, 29)
    assert [h.get("x-stainless-retry-count") for h in server.headers] == ["0", "1", "2"]
    assert all(h["authorization"] == f"Bearer {SECRET}" for h in server.headers)
    assert "Retrying request" in caplog.text and SECRET not in caplog.text


def test_exhausted_retries_are_one_line_and_end_without_a_sleep(serve, monkeypatch):
    delay = 0.4
    server = serve(10**6, retry_after_ms=int(delay * 1000))
    backend = _backend(server, monkeypatch, max_retries=2)
    with pytest.raises(BackendError) as err:
        backend.generate([_request()])
    failed_at = time.monotonic()
    message = str(err.value)
    assert "\n" not in message and "after 3 attempts" in message and "HTTP 500" in message
    assert SECRET not in message
    assert len(server.arrivals) == 3
    gaps = [b - a for a, b in zip(server.arrivals, server.arrivals[1:])]
    assert all(delay - 0.02 <= g < delay + 0.3 for g in gaps), gaps  # the client waited between tries
    # ... and raised right after the last one: a sleep after it would add another `delay`.
    assert failed_at - server.arrivals[-1] < delay / 2, failed_at - server.arrivals[-1]


def test_a_client_error_is_reported_not_retried(serve, monkeypatch):
    server = serve(10**6, fail_status=401)
    [gen] = _backend(server, monkeypatch, max_retries=5).generate([_request()])
    assert len(server.arrivals) == 1
    assert (gen.error, gen.finish_reason, gen.attempts, gen.text) == ("HTTP 401", "error", 1, "")


def test_an_unconstrained_answer_is_held_to_the_requested_schema(serve, monkeypatch, tmp_path):
    """The endpoint ignores ``response_format`` (as many do): an over-long field and a wrong type
    are rejected under their own reasons in the manifest; the valid answer is kept."""
    from synth.pipeline import Pipeline, Settings
    from synth.prompts import example_schema

    too_long = dict(ANSWER, S1="x" * 41)  # maxLength is 40 below
    wrong_type = dict(ANSWER, S2=42)
    server = serve(0, answers=[json.dumps(too_long), json.dumps(wrong_type), json.dumps(ANSWER)])
    backend = _backend(server, monkeypatch, max_retries=0)
    backend.concurrency = 1  # answers go out in request order
    settings = Settings(out=str(tmp_path / "out"), backend="openai", model="served-model", categories=["sts"],
                        num_tasks=3, examples_per_task=1, max_attempts=1, max_field_chars=40)
    manifest = Pipeline(settings, lambda: backend).run(progress=False)
    assert all(b["response_format"]["json_schema"]["schema"] == example_schema("sts", 40) for b in server.bodies)
    totals = manifest["totals"]
    assert (totals["generated"], totals["accepted"], totals["rejected"]) == (3, 1, 2)
    assert totals["rejected_by_reason"] == {"field_too_long": 1, "wrong_type": 1}
    [shard] = (tmp_path / "out" / "shards").glob("*.jsonl")
    [record] = [json.loads(line) for line in shard.read_text().splitlines()]
    assert (record["query"], record["positive"], record["negatives"]) == (ANSWER["S1"], ANSWER["S2"], [ANSWER["S3"]])


def test_corpus_mode_sends_plain_few_shot_prompts_to_the_completions_endpoint(serve, tmp_path, monkeypatch):
    """Few-shot prompts go to /v1/completions with the stop string; chat-form ones to chat
    completions with the task/query schema; both come back as grounded records."""
    import subprocess
    import sys

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('{"id": "d1", "text": "Cats purr when they are content."}\n'
                      '{"id": "d2", "text": "The Nile flows north into the Mediterranean Sea."}\n')
    server = serve(0, answers=[" Why do cats purr?", " Where does the Nile flow?"])
    monkeypatch.setenv("SYNTH_UNIT_KEY", SECRET)
    base = [sys.executable, "-m", "synth.generate", "--backend", "openai", "--base-url", server.base_url, "--model",
            "served-model", "--api-key-env", "SYNTH_UNIT_KEY", "--corpus", str(corpus), "--query-kinds", "question",
            "--concurrency", "1", "--no-progress"]
    run = subprocess.run([*base, "--out", str(tmp_path / "fewshot")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert server.paths == ["/v1/completions"] * 2
    assert all(b["stop"] == ["\n"] and b["prompt"].endswith("Question:") and "messages" not in b for b in server.bodies)
    assert {b["prompt"].split("Passage: ")[-1].split("\n")[0] for b in server.bodies} == {
        "Cats purr when they are content.", "The Nile flows north into the Mediterranean Sea."}
    records = [json.loads(l) for p in sorted((tmp_path / "fewshot" / "shards").glob("*.jsonl"))
               for l in p.read_text().splitlines()]
    assert sorted(r["query"] for r in records) == ["Where does the Nile flow?", "Why do cats purr?"]
    assert {r["meta"]["passage_id"] for r in records} == {"d1", "d2"}

    chat = serve(0, answers=[json.dumps({"task": "Find facts about animals", "query": "Why do cats purr?"})])
    run = subprocess.run([*base[:6], chat.base_url, *base[7:], "--prompt-form", "chat", "--out", str(tmp_path / "chat")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert chat.paths == ["/v1/chat/completions"] * 2
    schema = chat.bodies[0]["response_format"]["json_schema"]["schema"]
    assert schema["required"] == ["task", "query"]
    records = [json.loads(l) for p in sorted((tmp_path / "chat" / "shards").glob("*.jsonl"))
               for l in p.read_text().splitlines()]
    # the same query for both passages: the second is a duplicate
    assert [r["instruction"] for r in records] == ["Find facts about animals"] and len(records) == 1
