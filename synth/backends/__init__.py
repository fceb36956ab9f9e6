"""Generation backends behind one interface: ``Backend.generate(requests) -> generations`` and,
for relabelling, ``Backend.score(requests) -> token log-probabilities``."""

from __future__ import annotations

from synth.backends.base import Backend, BackendError, ChatRequest, Generation, ScoreRequest


def create_backend(name: str, **options) -> Backend:
    """Build a backend by name; a missing package gives a one-line error with the install command."""
    if name == "transformers":
        from synth.backends.transformers_backend import TransformersBackend

        return TransformersBackend(**options)
    if name == "vllm":
        from synth.backends.vllm_backend import VLLMBackend

        return VLLMBackend(**options)
    if name == "openai":
        from synth.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(**options)
    raise BackendError(f"unknown backend {name!r}: use transformers, vllm or openai")


__all__ = ["Backend", "BackendError", "ChatRequest", "Generation", "ScoreRequest", "create_backend"]
