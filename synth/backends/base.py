"""The backend interface. Backends turn requests into text (``generate``) and, where the engine
exposes log-probabilities, score given continuations (``score``); prompt building, parsing,
filtering, relabelling and storage are shared code in ``synth``."""

from __future__ import annotations

from dataclasses import dataclass, field


class BackendError(RuntimeError):
    """A backend cannot run (package missing, endpoint unreachable, model not loadable)."""


@dataclass(frozen=True)
class ChatRequest:
    """One generation. ``messages`` go through the model's chat template; a ``prompt`` instead is
    a plain completion prompt (few-shot prompts for small or base models), continued as is.
    Generation ends at the first of ``stop`` (the stop string itself is not returned)."""

    messages: list[dict] | None
    schema: dict | None
    seed: int
    max_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    prompt: str | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScoreRequest:
    """The log-probability of ``target_ids`` following ``context_ids``, token by token: what the
    LLM judge reads (query likelihood, the odds of a yes/no answer). Token ids, not text, so that
    every backend scores exactly the same tokens."""

    context_ids: tuple[int, ...]
    target_ids: tuple[int, ...]


@dataclass
class Generation:
    text: str
    tokens_in: int = 0
    tokens_out: int = 0
    finish_reason: str = "stop"
    attempts: int = 1
    error: str | None = None


@dataclass
class Backend:
    """Base class: subclasses implement ``generate`` for a batch of requests (in order)."""

    model: str = "default"
    info: dict = field(default_factory=dict)

    def generate(self, requests: list[ChatRequest]) -> list[Generation]:  # pragma: no cover - interface
        raise NotImplementedError

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        """Per-token log-probabilities of each request's target, in order."""
        raise BackendError(f"the {type(self).__name__} cannot score continuations (no prompt log-probabilities); "
                           "relabel with --backend transformers or vllm")

    def tokenize(self, text: str, special: bool) -> tuple[int, ...]:
        """Token ids of ``text`` under the generator's tokenizer (``special``: with the tokens a
        prompt starts with, e.g. BOS)."""
        tokenizer = getattr(self, "tokenizer", None)
        if tokenizer is None:
            raise BackendError(f"the {type(self).__name__} has no local tokenizer to score with")
        return tuple(tokenizer(text, add_special_tokens=special)["input_ids"])

    def describe(self) -> dict:
        """What the manifest records about this backend (never secrets)."""
        return {"backend": type(self).__name__, "model": self.model, **self.info}

    def close(self) -> None:
        pass


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    cuts = [text.index(s) for s in stop if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def missing_package(package: str, install: str) -> BackendError:
    return BackendError(f"the {package} backend needs the '{package}' package: {install}")


def model_path(model: str) -> str:
    """The local folder (or hub id) to load for ``model``: the default aliases resolve to the
    converted packaged model. Uses llmembed's stdlib-only resolver, so synth never imports the
    model code; its errors become one-line ``BackendError``s."""
    from pathlib import Path

    from llmembed.resolve import AssetError, ModelPathError, missing_tokenizer_files, resolve_model_path

    try:
        path = resolve_model_path(model)
    except (AssetError, ModelPathError) as err:
        raise BackendError(f"model {model!r}: {err}") from None
    missing = missing_tokenizer_files(Path(path)) if Path(path).is_dir() else []
    if missing:  # transformers and vLLM would look for the rest on the hub
        raise BackendError(f"model {model!r}: {path}: incomplete model folder (half copied?), missing "
                           f"{', '.join(missing)}")
    return path
