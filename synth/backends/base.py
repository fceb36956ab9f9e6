"""The backend interface. Backends only turn chat requests into text; prompt building,
parsing, filtering and storage are shared code in ``synth``."""

from __future__ import annotations

from dataclasses import dataclass, field


class BackendError(RuntimeError):
    """A backend cannot run (package missing, endpoint unreachable, model not loadable)."""


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict]
    schema: dict | None
    seed: int
    max_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0


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

    def describe(self) -> dict:
        """What the manifest records about this backend (never secrets)."""
        return {"backend": type(self).__name__, "model": self.model, **self.info}

    def close(self) -> None:
        pass


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
