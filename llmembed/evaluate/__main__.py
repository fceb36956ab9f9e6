"""``python -m llmembed.evaluate --model DIR [--model DIR ...] [--suite offline] [--data heldout.jsonl]``

Scores models on the offline suite (real labelled data shipped in packages, run through mteb's
own metric code; see ``llmembed/evaluate/suite.py``) and on held-out record files. ``--model``
takes our trained folders, our exports and any sentence-transformers folder; ``--reference``
adds the packaged all-MiniLM-L6-v2 as a yardstick row and ``--baseline`` the untrained
configuration of each trained folder. Prints one table; ``--json`` writes every score.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from llmembed.argtypes import int_at_least
from llmembed.data import DataError, read_jsonl
from llmembed.serve.encoders import BACKENDS, EncoderError, TextEncoder, describe, load_encoder, reference_model_dir
from llmembed.evaluate import runner
from llmembed.evaluate.suite import SUITE, SuiteError
from llmembed.model import model_inputs
from llmembed.outputs import Kind, any_json_with, check_output, write_text

REPORT_KIND = Kind("a score report of llmembed.evaluate", folder=False, recognise=any_json_with("models", "scores"))


def _baseline(encoder: TextEncoder, folder: Path) -> TextEncoder | None:
    """The same configuration before training: the base backbone it names, a fresh pooling head
    and no adapter. Only for trained folders (LoRA, full or merged); an export names itself as
    its backbone, so it has no untrained configuration to show."""
    from llmembed.model import CONFIG_FILE, EmbeddingModel

    if encoder.kind != "llmembed" or not (folder / CONFIG_FILE).is_file():
        return None

    model = EmbeddingModel.build(replace(encoder.model.config, lora=None))
    return TextEncoder.of(model, f"{encoder.name} (untrained)")


def _width(text: str) -> int | None:
    """A ``--dim`` value: a width of at least 1, or ``full`` (None)."""
    if text == "full":
        return None
    try:
        return int_at_least(1)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a width >= 1 or 'full', got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmembed.evaluate", description=__doc__.split("\n\n")[1])
    parser.add_argument("--model", action="append", required=True,
                        help="our trained folder or export, or a sentence-transformers folder (repeatable)")
    parser.add_argument("--suite", choices=("offline", "none"), default=None,
                        help="the offline suite (default: on unless only --data is given)")
    parser.add_argument("--tasks", default=",".join(SUITE), help=f"suite tasks, comma-separated ({', '.join(SUITE)})")
    parser.add_argument("--data", action="append", default=[], help="held-out records JSONL to score retrieval on")
    parser.add_argument("--reference", action="store_true", help="add the packaged all-MiniLM-L6-v2 as a row")
    parser.add_argument("--baseline", action="store_true", help="add the untrained configuration of trained folders")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="how to load our exports: llmembed (default) or sentence-transformers")
    parser.add_argument("--dim", type=_width, action="append", default=[],
                        help="score every model on the first DIM dimensions of its vectors, re-normalised "
                             "(Matryoshka prefixes); repeat for a sweep (each text is encoded once), "
                             "'full' for the whole width")
    parser.add_argument("--json", help="write every score here")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier --json report of this command")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a model whose backbone or tokenizer runs code from its own files")
    args = parser.parse_args(argv)
    suite = args.suite or ("none" if args.data else "offline")
    names = [t.strip() for t in args.tasks.split(",") if t.strip()] if suite == "offline" else []
    try:
        # Inputs first (seconds), models after (longer): a wrong path never waits on a load.
        unknown = [t for t in names if t not in SUITE]
        if unknown:
            raise SuiteError(f"--tasks: unknown task(s) {', '.join(unknown)}; known: {', '.join(SUITE)}")
        for path in args.data:
            if not read_jsonl(path):
                raise DataError(f"{path}: no records to evaluate")
        if not names and not args.data:
            raise SuiteError("nothing to evaluate: --suite none and no --data")
        for folder in args.model:
            if not Path(folder).is_dir():
                raise EncoderError(f"{folder}: no such model folder")
        if args.json:
            inputs = [*args.data, *(p for folder in args.model for p in model_inputs(folder))]
            check_output(args.json, inputs=inputs, kind=REPORT_KIND, overwrite=args.overwrite, flag="--json")
        encoders: list[TextEncoder] = []
        for folder in args.model:
            encoder = load_encoder(folder, args.backend, args.trust_remote_code)
            baseline = _baseline(encoder, Path(folder)) if args.baseline else None
            encoders += [e for e in (baseline, encoder) if e is not None]
        reference = load_encoder(reference_model_dir()) if args.reference else None
        if reference is not None:
            encoders.insert(0, reference)
        if args.dim:
            encoders = [view for e in encoders for view in e.widths(args.dim)]
        rows, models = {}, {}
        for encoder in encoders:
            name = encoder.name if encoder.name not in rows else f"{encoder.name} ({len(rows)})"
            rows[name] = runner.run(encoder, names, args.data)
            models[name] = describe(encoder)
    except (DataError, EncoderError, SuiteError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(runner.table(rows, reference.name if reference is not None else None))
    if args.json:
        write_text(args.json, json.dumps(runner.as_json(rows, models), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
