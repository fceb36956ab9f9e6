"""Synthetic pairs, two ways.

Grounded (the default): queries written for a corpus's passages (``synth.generate --corpus``),
then ``synth.relabel``: the same LLM picks each query's positive among the passage and its
nearest neighbours under the teacher, and drops queries that do not find their own passage
again (round trip). With your own corpus one passage in ten is held out with its queries
(:mod:`synth.split`), the one test your documents have.

Invented (``--invent``, E5-mistral's scheme, a strong generator's job): the generator writes
both sides; text checks (:func:`synth.filters.text_check`) and the teacher's score (pairs under
0.4 dropped, Conan's rule) filter both splits.
"""

from __future__ import annotations

from pathlib import Path

from llmembed.data.packaged import INSTRUCTION
from llmembed.outputs import write_text
from launch.stages.data import answers_corpus
from launch.stages.runner import PY, Job, Stage, count_records
from synth.filters import text_check_file
from synth.split import split_by_passage

# Conan-embedding's rule: a pair whose positive the teacher scores under this is dropped.
MIN_TEACHER_SCORE = 0.4


def grounded(job: Job, teacher: str, chatterbot_train: Path) -> tuple[Path, Path]:
    """Training and held-out pairs (the held-out file is empty without ``--corpus``: the
    chatterbot held-out split is then the test and every synthetic pair trains)."""
    opts = job.settings
    corpus = opts.corpus
    instruction: list[str] = []
    if corpus is None:  # the chatterbot training answers, and the chatterbot task's instruction
        corpus = answers_corpus(job, chatterbot_train)
        instruction = ["--instruction", INSTRUCTION]
    synth = job.out / "synth"
    job.run(Stage("synth", [
        [PY, "-m", "synth.generate", "--out", str(synth), "--corpus", str(corpus), "--backend", opts.synth_backend,
         "--model", opts.generator, "--query-kinds", *opts.query_kinds, "--queries-per-passage",
         str(opts.queries_per_passage), *(["--max-passages", str(opts.max_passages)] if opts.max_passages else []),
         "--temperature", str(opts.synth_temperature), "--max-tokens", "40",
         "--passage-max-tokens", "128", "--batch-size", "32", "--no-progress", *instruction, *opts.synth_args],
    ], inputs=(opts.generator_dir, corpus), outputs=(synth / "manifest.json",)))
    relabelled = job.data / "synthetic_relabelled.jsonl"
    scorer = ["--backend", opts.synth_backend] if opts.synth_backend != "openai" else []
    job.run(Stage("relabel", [
        [PY, "-m", "synth.relabel", "--input", str(synth), "--embedder", teacher, "--out", str(relabelled),
         "--model", opts.generator, *scorer, "--round-trip-k", str(opts.round_trip_k), "--batch-size", "32",
         *(["--relevance"] if opts.relevance else []), "--no-progress", "--overwrite"],
    ], inputs=(synth / "manifest.json", teacher, opts.generator_dir), outputs=(relabelled,)))
    train, heldout = job.data / "synthetic_train.jsonl", job.data / "synthetic_heldout.jsonl"
    if opts.corpus is None:
        write_text(heldout, "")
        return relabelled, heldout
    job.run(Stage("synth_split", call=split_by_passage, args=(relabelled, train, heldout), inputs=(relabelled,),
                  outputs=(train, heldout)))
    return train, heldout


def invented(job: Job, teacher: str) -> tuple[Path, Path]:
    """Training and held-out pairs the generator invented, filtered (a held-out pair the teacher
    calls unrelated measures noise, so both splits are)."""
    opts = job.settings
    synth = job.out / "synth"
    merged = synth / "merged"
    job.run(Stage("synth", [
        [PY, "-m", "synth.generate", "--out", str(synth), "--backend", opts.synth_backend, "--model", opts.generator,
         "--categories", "short_long", "short_short", "--num-tasks", str(opts.synth_tasks),
         "--examples-per-task", str(opts.synth_examples), "--temperature", str(opts.synth_temperature),
         "--max-tokens", "256", "--max-field-chars", "400", "--no-progress",
         *(["--languages", *opts.synth_languages] if opts.synth_languages else []), *opts.synth_args],
        [PY, "-m", "synth.merge", "--out", str(synth), "--heldout-share", "0.5", "--overwrite"],
    ], inputs=(opts.generator_dir,), outputs=(merged / "train.jsonl", merged / "heldout.jsonl")))
    return (filtered(job, merged / "train.jsonl", "synth_train", teacher),
            filtered(job, merged / "heldout.jsonl", "synth_heldout", teacher))


def filtered(job: Job, source: Path, name: str, teacher: str) -> Path:
    """Cheap text checks, then the teacher's score filter."""
    sane, kept = job.data / f"{name}_sane.jsonl", job.data / f"{name}.jsonl"
    job.run(Stage(f"{name}_sanity", call=text_check_file, args=(source, sane), inputs=(source,), outputs=(sane,)))
    if count_records(sane) < 2:
        print(f"[pipeline] {name}: fewer than 2 pairs passed the text checks; none kept", flush=True)
        write_text(kept, "")
        return kept
    if kept.is_file() and not kept.stat().st_size:
        kept.unlink()  # the placeholder above, from a run with fewer pairs: mine writes it now
    job.run(Stage(f"{name}_filter", [
        [PY, "-m", "llmembed.mine", "--model", teacher, "--input", str(sane), "--out", str(kept),
         "--min-positive-score", str(MIN_TEACHER_SCORE), "--ranks", "0:1", "--num-negatives", "1",
         "--keep-existing-negatives", "--no-progress", "--overwrite"]], inputs=(sane, teacher), outputs=(kept,)))
    return kept
