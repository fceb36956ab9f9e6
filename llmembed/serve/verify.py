"""Serving parity check for an export: does every way of serving it give our vectors?

    python -m llmembed.serve.verify EXPORT_DIR [--vllm-python PATH]      (or: llmembed-verify ...)

A fixed probe set (short, one token, an 8-sentence query, texts past the serving length, CJK,
emoji, surrounding whitespace, an instruction-formatted query) is embedded by:

- ``llmembed``: our :meth:`EmbeddingModel.encode` on the export (the reference), following the
  export's ``llmembed_serving.json``;
- ``sentence-transformers``: ``SentenceTransformer(EXPORT_DIR)`` with its saved prompts;
- ``transformers``: a plain ``AutoTokenizer``/``AutoModel`` forward with the pooling written
  out by hand, as a user would from the model card;
- ``vllm``: real vLLM (``runner="pooling"``) in the interpreter given by ``--vllm-python``.

Each path is compared with the reference text by text: cosine and token count. A path fails
when any cosine is below 0.9999 (both sides fp32) or 0.999 (bf16/fp16 involved), or when its
token counts differ (an EOS lost, a prompt applied twice). The exit status is 1 on any failure.

A Matryoshka export (``matryoshka_dims`` in the contract) is checked at each listed width below
the full one as well, through each server's own truncation: sentence-transformers'
``truncate_dim`` and vLLM's ``dimensions`` pooling parameter, against the prefix of the
reference vector (rows such as ``vllm @64d``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmembed.model import EmbeddingModel
from llmembed.outputs import Kind, any_json_with, check_output, write_text
from llmembed.pooling import POOLINGS
from llmembed.remote_code import check_no_remote_code
from llmembed.serving import ServingContract

FP32_MIN_COS = 0.9999
LOW_PRECISION_MIN_COS = 0.999
WORKER = Path(__file__).with_name("vllm_embed.py")
REPORT_KIND = Kind("a report of llmembed.serve.verify", folder=False, recognise=any_json_with("paths", "probes"))

_SENTENCES = [
    "The committee met on Tuesday to review the budget for the coming year.",
    "Several members raised concerns about the rising cost of maintenance.",
    "After a long discussion, they agreed to postpone the new building project.",
    "The treasurer presented three options for reducing expenses.",
    "One proposal was to share equipment with the neighbouring town.",
    "Another suggested raising the fees for the community hall.",
    "The final decision will be made at the next meeting in March.",
    "Until then, every department must keep spending to a minimum.",
]


@dataclass(frozen=True)
class Probe:
    name: str
    text: str
    is_query: bool
    instruction: str | None = None  # None: the contract's default instruction (queries only)


def probe_set(contract: ServingContract, count_tokens) -> list[Probe]:
    """The fixed probes; the long ones are sized from the export's serving length."""
    paragraph = " ".join(_SENTENCES)
    long_text = paragraph
    while count_tokens(long_text) <= contract.max_length + 16:
        long_text += " " + paragraph
    return [
        Probe("short query", "how do plants make food?", True),
        Probe("short passage", "Photosynthesis turns light, water and carbon dioxide into sugar.", False),
        Probe("one-token passage", "a", False),
        Probe("one-token query", "a", True),
        Probe("8-sentence query", paragraph, True),
        Probe("8-sentence passage", paragraph, False),
        Probe("query past max_length", long_text, True),
        Probe("passage past max_length", long_text, False),
        Probe("CJK passage", "机器学习是人工智能的一个分支，研究计算机如何从数据中学习。", False),
        Probe("CJK query", "什么是机器学习？", True),
        Probe("emoji passage", "Best pizza in town 🍕🔥 — we loved it 😀👍", False),
        Probe("whitespace passage", "  \t leading and trailing whitespace \n\n ", False),
        Probe("instruction query", "A man is playing a guitar on stage.", True,
              "Retrieve semantically similar sentences"),
    ]


@dataclass
class PathResult:
    path: str
    cosines: list[float] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)
    threshold: float = FP32_MIN_COS
    skipped: str | None = None  # why this path did not run
    error: str | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.skipped is not None or (self.error is None and not self.failures)


@dataclass
class VerifyReport:
    export_dir: Path
    probes: list[Probe]
    reference_tokens: list[int]
    paths: list[PathResult]

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.paths)

    def table(self) -> str:
        header = f"{'path':<28} {'min cos':>9} {'need':>7} {'tokens equal':>13}  status"
        lines = [f"serving parity of {self.export_dir} ({len(self.probes)} probes, reference: llmembed encode)",
                 header, "-" * len(header)]
        for p in self.paths:
            if p.skipped:
                lines.append(f"{p.path:<28} {'-':>9} {'-':>7} {'-':>13}  skipped: {p.skipped}")
                continue
            if p.error:
                lines.append(f"{p.path:<28} {'-':>9} {'-':>7} {'-':>13}  ERROR: {p.error}")
                continue
            status = "ok" if p.ok else "MISMATCH"
            if not p.cosines:  # a check of the files themselves
                lines.append(f"{p.path:<28} {'-':>9} {'-':>7} {'-':>13}  {status}")
                continue
            same = sum(a == b for a, b in zip(p.token_counts, self.reference_tokens))
            lines.append(f"{p.path:<28} {min(p.cosines):>9.6f} {p.threshold:>7.4f} "
                         f"{f'{same}/{len(self.probes)}':>13}  {status}")
        for p in self.paths:
            for failure in p.failures:
                lines.append(f"  {p.path}: {failure}")
        return "\n".join(lines)

    def summary(self) -> str:
        bad = [p for p in self.paths if not p.ok]
        if not bad:
            return "all paths agree"
        return "; ".join(f"{p.path}: {p.error or ', '.join(p.failures[:3])}" for p in bad)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row cosines; two zero vectors agree (cosine 1), a zero and a non-zero one do not (0)."""
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = (a * b).sum(axis=1) / np.maximum(norm_a * norm_b, 1e-30)
    return np.where((norm_a < 1e-12) & (norm_b < 1e-12), 1.0, cos)


def _compare(result: PathResult, probes: list[Probe], reference: np.ndarray, ref_tokens: list[int],
             vectors: np.ndarray, tokens: list[int], check_norms: bool = True) -> PathResult:
    """Cosine and token count per probe, and with ``check_norms`` the vector norms too."""
    if vectors.shape != reference.shape:
        result.error = f"vectors of shape {vectors.shape}, expected {reference.shape}"
        return result
    result.cosines = [float(c) for c in _cosines(reference, vectors)]
    result.token_counts = list(tokens)
    # Cosine ignores scale: the norms are compared on their own (a lost Normalize module).
    ref_norms, norms = np.linalg.norm(reference, axis=1), np.linalg.norm(vectors, axis=1)
    norm_tolerance = 10 * (1 - result.threshold)
    for probe, cos, n, ref_n, norm, ref_norm in zip(probes, result.cosines, tokens, ref_tokens, norms, ref_norms):
        problems = []
        if not cos >= result.threshold:
            problems.append(f"cos {cos:.6f}")
        if check_norms and not abs(norm - ref_norm) <= norm_tolerance * max(ref_norm, 1e-6):
            problems.append(f"norm {norm:.4f}, reference {ref_norm:.4f}")
        if n != ref_n:
            problems.append(f"{n} tokens, reference {ref_n}")
        if problems:
            result.failures.append(f"{probe.name!r} ({probe.text[:40]!r}): {', '.join(problems)}")
    return result


def _prefixed(contract: ServingContract, probe: Probe) -> str:
    return (contract.query_prefix(probe.instruction) if probe.is_query else contract.passage_prefix()) + probe.text


def _low_precision(dtype: str | None) -> bool:
    return str(dtype).replace("torch.", "") in ("bfloat16", "float16")


def _export_dtype(export_dir: Path) -> str:
    config = json.loads((export_dir / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


# ---------------------------------------------------------------------- paths
def _encode_reference(model, probes: list[Probe], contract: ServingContract) -> tuple[np.ndarray, list[int]]:
    vectors, tokens = [], []
    for probe in probes:
        # Explicit instructions: the reference model may carry another default than the export.
        instruction = (probe.instruction or contract.prompts.default_instruction) if probe.is_query else None
        vectors.append(model.encode([probe.text], instruction=instruction, is_query=probe.is_query))
        batch = model.tokenize([probe.text], instruction, is_query=probe.is_query)
        tokens.append(int(batch["attention_mask"].sum()))
    return np.concatenate(vectors), tokens


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def saved_fact_mismatches(export_dir: Path, contract: ServingContract) -> list[str]:
    """Every serving fact the export's files tell a server, compared with the contract; one
    line per disagreement, naming the file and the fact. Servers read these files, not the
    contract, so an edited prompt or a lost module changes what users get."""
    found = []

    def expect(where: str, fact: str, saved, wanted) -> None:
        if saved != wanted:
            found.append(f"{where}: {fact} is {saved!r}, the contract says {wanted!r}")

    st_config = _json(export_dir / "config_sentence_transformers.json")
    prompts = st_config.get("prompts") or {}
    expect("config_sentence_transformers.json", "prompts.query", prompts.get("query"), contract.query_prefix())
    expect("config_sentence_transformers.json", "prompts.document", prompts.get("document") or "",
           contract.passage_prefix())
    expect("config_sentence_transformers.json", "default_prompt_name", st_config.get("default_prompt_name"),
           "document" if contract.passage_prefix() else None)
    modules = json.loads((export_dir / "modules.json").read_text()) if (export_dir / "modules.json").is_file() else []
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules if isinstance(m, dict)]
    expect("modules.json", "a Normalize module", "Normalize" in kinds, contract.normalize)
    backbone = _json(export_dir / "config.json")
    pooling = next((m for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling")), None)
    if pooling is None:
        found.append("modules.json: no pooling module")
    elif contract.st_pooling_mode() is not None:
        where = f"{pooling.get('path') or '.'}/config.json"
        saved = _json(export_dir / str(pooling.get("path", "")) / "config.json")
        expect(where, "pooling_mode", saved.get("pooling_mode"), contract.st_pooling_mode())
        expect(where, "include_prompt", saved.get("include_prompt"), contract.pooling.include_instruction)
        expect(where, "embedding_dimension", saved.get("embedding_dimension"), backbone.get("hidden_size"))
    expect("sentence_bert_config.json", "max_seq_length",
           _json(export_dir / "sentence_bert_config.json").get("max_seq_length"), contract.max_length)
    expect("config.json", "is_causal", backbone.get("is_causal"), contract.is_causal)
    expect("config.json", "matryoshka_dimensions", backbone.get("matryoshka_dimensions"),
           sorted(contract.matryoshka_dims) if contract.matryoshka_dims else None)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    ids = tokenizer("a")["input_ids"]
    expect("tokenizer", "appends EOS", bool(ids) and ids[-1] == tokenizer.eos_token_id, contract.append_eos)
    expect("tokenizer", "has a chat template", bool(getattr(tokenizer, "chat_template", None)), False)
    return found


def _sentence_transformers(export_dir: Path, contract: ServingContract, probes: list[Probe], widths: list[int]):
    """What a sentence-transformers user calls: queries with the export's saved ``query`` prompt
    (``prompt_name="query"``; a query of another task with its instruction as ``prompt``),
    documents with no prompt at all (the saved default applies), the contract's output width as
    ``truncate_dim``, and the vectors exactly as ST returns them."""
    from llmembed.serve.st_modules import load_sentence_transformer

    st = load_sentence_transformer(export_dir, truncate_dim=contract.output_dim)
    vectors, tokens = [], []
    cut: dict[int, list[np.ndarray]] = {width: [] for width in widths}
    for probe in probes:
        if probe.is_query and probe.instruction is not None:
            how, prefix = {"prompt": contract.query_prefix(probe.instruction)}, contract.query_prefix(probe.instruction)
        elif probe.is_query:
            how, prefix = {"prompt_name": "query"}, st.prompts.get("query", "")
        else:
            how, prefix = {}, st.prompts.get(st.default_prompt_name, "") if st.default_prompt_name else ""
        vectors.append(st.encode([probe.text], convert_to_numpy=True, **how))
        for width in widths:
            cut[width].append(st.encode([probe.text], convert_to_numpy=True, truncate_dim=width, **how))
        ids = st.tokenizer(prefix + probe.text, truncation=True, max_length=st.max_seq_length)["input_ids"]
        tokens.append(len(ids))
    by_width = {width: np.concatenate(parts).astype(np.float32) for width, parts in cut.items()}
    return np.concatenate(vectors).astype(np.float32), tokens, str(st[0].model.dtype), by_width


def _transformers(export_dir: Path, contract: ServingContract, probes: list[Probe], widths: list[int]):
    """What a user writes from the model card: plain tokenizer call, forward, pool by hand
    (a Matryoshka width is a slice by hand too, so it gets no rows of its own)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    model = AutoModel.from_pretrained(str(export_dir), dtype="auto").eval()
    pooling = POOLINGS[contract.pooling.kind]
    vectors, tokens = [], []
    for probe in probes:
        prefix = contract.query_prefix(probe.instruction) if probe.is_query else contract.passage_prefix()
        enc = tokenizer(prefix + probe.text, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**enc).last_hidden_state[0].float()
        skip = 0
        if not contract.pooling.include_instruction and prefix:
            prompt_ids = tokenizer(prefix)["input_ids"]
            if prompt_ids and prompt_ids[-1] in tokenizer.all_special_ids:
                prompt_ids = prompt_ids[:-1]
            skip = len(prompt_ids)
        vector = pooling.pool_by_hand(hidden, skip)
        if contract.output_dim is not None:
            vector = vector[: contract.output_dim]
        if contract.normalize:
            vector = torch.nn.functional.normalize(vector, dim=0)
        vectors.append(vector.numpy()[None])
        tokens.append(int(enc["input_ids"].shape[1]))
    return np.concatenate(vectors), tokens, str(model.dtype), {}


def vllm_interpreter(python: str) -> str:
    """An absolute path for ``python`` (the worker runs in a temporary folder), or an error;
    checked before any work is done."""
    found = shutil.which(python) if os.sep not in python else (python if Path(python).is_file() else None)
    if found is None:
        raise FileNotFoundError(f"--vllm-python {python}: no such interpreter")
    return str(Path(found).absolute())


def _vllm(export_dir: Path, contract: ServingContract, probes: list[Probe], widths: list[int], python: str,
          timeout: float):
    python = vllm_interpreter(python)
    export_dir = export_dir.absolute()
    with tempfile.TemporaryDirectory(prefix="llmembed-verify-") as tmp:
        tmp_path = Path(tmp)
        inputs, outputs = tmp_path / "in.json", tmp_path / "out.json"
        inputs.write_text(json.dumps([_prefixed(contract, p) for p in probes], ensure_ascii=False), encoding="utf-8")
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        env.update(VLLM_CACHE_ROOT=str(tmp_path / "vllm-cache"), TMPDIR=str(tmp_path))
        # The export's own dtype: vLLM's "auto" runs an fp32 export in fp16 on CPU.
        cmd = [python, str(WORKER), str(export_dir), str(inputs), str(outputs), "--dtype", _export_dtype(export_dir),
               "--dimensions", ",".join(map(str, widths))]
        proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"vLLM did not finish within {timeout:.0f} s") from None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # vLLM's own workers included
            except ProcessLookupError:
                pass
        if proc.returncode != 0:
            last = [line for line in log.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
            raise RuntimeError(f"vLLM exited with {proc.returncode}: {last[0][:300]}")
        served = json.loads(outputs.read_text())
    if served["is_causal"] is not None and served["is_causal"] is not contract.is_causal:
        raise RuntimeError(f"vLLM read is_causal={served['is_causal']}, the contract says {contract.is_causal}")
    by_width = {int(w): np.asarray(v, dtype=np.float32) for w, v in served.get("by_dimensions", {}).items()}
    return np.asarray(served["embeddings"], dtype=np.float32), served["token_counts"], served["dtype"], by_width


# ---------------------------------------------------------------------- entry points
def verify(export_dir: str | Path, vllm_python: str | None = None, reference=None,
           vllm_timeout: float = 600) -> VerifyReport:
    """Embed the probe set through every available path and compare with ``reference`` (an
    :class:`EmbeddingModel`; by default the export loaded by llmembed in fp32)."""
    export_dir = Path(export_dir)
    if vllm_python:
        vllm_interpreter(vllm_python)
    check_no_remote_code(export_dir)  # before any loader reads it
    contract = ServingContract.load(export_dir)
    if reference is None:
        reference = EmbeddingModel.load(export_dir, dtype="float32", attn_implementation="sdpa")
    probes = probe_set(contract, lambda text: len(reference.tokenizer(text)["input_ids"]))
    ref_vectors, ref_tokens = _encode_reference(reference, probes, contract)
    export_low = _low_precision(_export_dtype(export_dir))
    # The Matryoshka widths a server truncates to itself; the full width is the plain check.
    widths = sorted(w for w in contract.matryoshka_dims or [] if w < ref_vectors.shape[1])

    runs = [("sentence-transformers", lambda: _sentence_transformers(export_dir, contract, probes, widths))]
    by_hand = POOLINGS[contract.pooling.kind].by_hand
    runs.append(("transformers", (lambda: _transformers(export_dir, contract, probes, widths)) if by_hand else None))
    runs.append(("vllm", (lambda: _vllm(export_dir, contract, probes, widths, vllm_python, vllm_timeout))
                 if vllm_python else None))

    saved = PathResult("saved files")
    saved.failures = saved_fact_mismatches(export_dir, contract)
    results = [saved]
    for name, run in runs:
        result = PathResult(name)
        results.append(result)
        if run is None:
            if name == "transformers":
                result.skipped = f"a plain forward has no {contract.pooling.kind} head"
            else:
                result.skipped = "no vLLM interpreter given (--vllm-python)"
            continue
        if name == "vllm" and contract.vllm_unsupported():
            result.skipped = contract.vllm_unsupported()
            continue
        try:
            vectors, tokens, dtype, by_width = run()
        except Exception as err:  # a path that cannot even load is a finding, reported in one line
            result.error = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            continue
        result.threshold = LOW_PRECISION_MIN_COS if (export_low or _low_precision(dtype)) else FP32_MIN_COS
        _compare(result, probes, ref_vectors, ref_tokens, vectors, tokens)
        for width in widths if by_width else []:
            cut = PathResult(f"{name} @{width}d", threshold=result.threshold)
            results.append(cut)
            if width not in by_width:
                cut.error = f"no vectors at width {width}"
                continue
            # Cosine only: servers differ on re-normalising a cut prefix (vLLM does, ST does not).
            _compare(cut, probes, ref_vectors[:, :width], ref_tokens, by_width[width], tokens, check_norms=False)
    return VerifyReport(export_dir, probes, ref_tokens, results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmembed.serve.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("export", help="export folder (python -m llmembed.serve.export)")
    parser.add_argument("--vllm-python", default=os.environ.get("LLMEMBED_VLLM_PYTHON"),
                        help="python of an environment with vLLM (default: $LLMEMBED_VLLM_PYTHON); "
                             "without it the vLLM column is skipped")
    parser.add_argument("--json", help="also write the per-probe results here")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier --json report of this command")
    args = parser.parse_args(argv)
    export_dir = Path(args.export)
    try:
        if args.json:
            check_output(args.json, inputs=[export_dir], kind=REPORT_KIND, overwrite=args.overwrite, flag="--json")
        report = verify(export_dir, args.vllm_python)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.table())
    if args.json:
        write_text(args.json, json.dumps({
            "ok": report.ok,
            "probes": [p.name for p in report.probes],
            "reference_tokens": report.reference_tokens,
            "paths": [{"path": p.path, "cosines": p.cosines, "token_counts": p.token_counts,
                       "threshold": p.threshold, "skipped": p.skipped, "error": p.error, "failures": p.failures}
                      for p in report.paths],
        }, indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
