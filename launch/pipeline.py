"""The main job as one pipeline: corpus -> queries -> relabel -> mine -> train -> evaluate -> export -> serve.

    bash launch/pipeline.sh                      # CPU, offline, the built-in default (sets up .venv)
    .venv/bin/python -m launch.pipeline [--out runs/pipeline] [--procs 2]

Each stage (:mod:`launch.stages`) runs the project's own command line, or a small file step in
process, and records what it did in ``<out>/stages/<stage>.json`` (work, fingerprints of the
files it reads, wall time); a rerun skips finished stages whose work and inputs are unchanged,
and the training stage resumes from its last checkpoint, so a killed pipeline, rerun with the
same command, continues. Training
writes to ``<out>/run-<fingerprint of config and data>``: an edited config trains anew. Stages:

1. ``corpus`` + ``synth`` + ``relabel``: queries grounded in a corpus (``synth.generate --corpus``):
   by default the chatterbot English training split's answers (answers only; no question is
   shown, and the held-out split stays unseen), or ``--corpus FILE``, your own documents. The
   default generator writes one question per passage from a few-shot prompt; ``synth.relabel``
   has the same LLM pick each query's positive among the passage and its nearest neighbours
   under the teacher, and drops queries that do not find their own passage again (round trip).
   With ``--corpus``, ``synth_split`` holds out one passage in ten (with every query whose
   positive it is) as a synthetic held-out task, the one test your documents have (by default
   the chatterbot held-out split is the test, and every synthetic pair trains). ``--invent`` runs E5-mistral's scheme instead (the generator
   invents both sides; a strong generator's job), filtered by text checks and the teacher's
   score (pairs under 0.4 dropped, Conan's rule).
2. ``data`` + ``mine``: chatterbot-corpus pairs (packaged; not with ``--corpus``, where your
   documents' synthetic pairs are all the training data) and the synthetic training pairs, hard
   negatives mined by the teacher with the positive-aware rule (optionally re-scored by
   ``--cross-encoder``).
3. ``train_seed<N>`` for each of ``--seeds``: LoRA on the default backbone under DeepSpeed ZeRO-2
   on ``--procs`` CPU processes; ``merge``: the seeds' models averaged weight by weight and the
   average's change from the pretrained backbone scaled by ``--merge-scale`` (``llmembed.merge
   --method linear --scale``), which is what the later stages evaluate and ship. One seed at
   scale 1 skips it.
4. ``evaluate``: the offline suite plus the synthetic held-out split, for the reference
   (all-MiniLM-L6-v2), the untrained configuration and the trained model.
5. ``export`` (checked by ``llmembed.serve.verify``), then the export scored again through
   sentence-transformers, and one query answered by the reloaded export.

``--train-config launch/configs/pipeline_gpu.yaml`` with ``--synth-backend vllm`` and a 7B
generator runs the same stages as the GPU recipe (README, "The main job on GPUs").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python launch/pipeline.py): the clone's root holds the launch package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmembed.argtypes import float_in, int_at_least
from llmembed.outputs import Kind, OutputError, check_output, folder_with
from llmembed.serve.encoders import reference_model_dir
from launch.stages import data, evaluation, mining, serving, synthetic, training
from launch.stages.runner import Job
from launch.stages.settings import PipelineSettings

PIPELINE_KIND = Kind("a pipeline folder (no stages/ in it)", folder=True, recognise=folder_with("stages"))


def run(job: Job) -> None:
    """The main job, stage by stage (module docstring)."""
    opts = job.settings
    teacher = opts.teacher or str(reference_model_dir())
    chatterbot = data.chatterbot(job)
    if opts.invent:
        synth_train, synth_heldout = synthetic.invented(job, teacher)
    else:
        synth_train, synth_heldout = synthetic.grounded(job, teacher, chatterbot / "train.jsonl")
    sources = [mining.mine(job, synth_train, "synthetic", teacher)]
    if opts.corpus is None:  # the real pairs beside the synthetic ones
        sources.insert(0, mining.mine(job, chatterbot / "train.jsonl", "chatterbot", teacher))
    model = training.train(job, data.combine(job, sources), teacher)
    scores = evaluation.evaluate(job, model, synth_heldout)
    export = serving.export(job, model)
    served = serving.serve(job, export, synth_heldout)
    # A question the model never saw: a held-out chatterbot question, or with your own corpus a
    # synthetic held-out query.
    own = opts.corpus is not None and synth_heldout.stat().st_size
    serving.answer(job, export, synth_heldout if own else chatterbot / "heldout.jsonl")
    evaluation.report(job, scores, served)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/pipeline")
    defaults = PipelineSettings()
    parser.add_argument("--procs", type=int_at_least(1), default=defaults.procs, help="training processes (CPU cores or GPUs)")
    parser.add_argument("--train-config", type=Path, default=defaults.train_config,
                        help="training YAML (default: launch/configs/pipeline.yaml; GPU: pipeline_gpu.yaml)")
    parser.add_argument("--corpus", type=Path, help='your own documents ({"text"} or {"id", "text"} lines): queries '
                        "are written for them and they are all the training data (default: the chatterbot answers, "
                        "beside the real pairs)")
    parser.add_argument("--queries-per-passage", type=int_at_least(1), default=defaults.queries_per_passage)
    parser.add_argument("--max-passages", type=int_at_least(1),
                        help="write queries for a seeded sample of this many passages (every passage stays a candidate)")
    parser.add_argument("--query-kinds", nargs="+", default=defaults.query_kinds,
                        help="synth.generate --query-kinds (question keywords claim title)")
    parser.add_argument("--relevance", action="store_true", help="synth.relabel --relevance (a larger generator)")
    parser.add_argument("--round-trip-k", type=int_at_least(1), default=defaults.round_trip_k)
    parser.add_argument("--invent", action="store_true",
                        help="E5-mistral's scheme instead: the generator invents queries and passages (a strong generator)")
    parser.add_argument("--synth-backend", choices=("transformers", "vllm", "openai"), default=defaults.synth_backend)
    parser.add_argument("--generator", default=defaults.generator, help="synth's --model (default: built-in SmolLM2)")
    parser.add_argument("--synth-tasks", type=int_at_least(1), default=defaults.synth_tasks, help="task definitions per category")
    parser.add_argument("--synth-examples", type=int_at_least(1), default=defaults.synth_examples, help="examples per task")
    parser.add_argument("--synth-temperature", type=float, default=defaults.synth_temperature)
    parser.add_argument("--synth-languages", nargs="*", default=defaults.synth_languages,
                        help="languages to generate (default English; give none for the taxonomy's weighted list)")
    parser.add_argument("--synth-arg", action="append", default=[], metavar="ARG",
                        help="passed on to synth.generate (repeat; e.g. --synth-arg=--tensor-parallel-size=2)")
    parser.add_argument("--teacher", help="embedding model that filters and mines (default: packaged all-MiniLM-L6-v2)")
    parser.add_argument("--cross-encoder", help="reranker that re-scores mined candidates (llmembed.mine --cross-encoder)")
    parser.add_argument("--ranks", default=defaults.ranks, help="mining rank window START:END")
    parser.add_argument("--num-negatives", type=int_at_least(1), default=defaults.num_negatives)
    parser.add_argument("--seeds", nargs="+", type=int_at_least(0), default=defaults.seeds,
                        help="train once per seed; several are merged into one model (default: 42)")
    parser.add_argument("--merge-scale", type=float_in(0.0, low_open=True), default=defaults.merge_scale,
                        help="scale of the merged model's change from the pretrained backbone (llmembed.merge "
                             f"--scale; default {defaults.merge_scale:g}; 1 with one seed skips the merge)")
    args = parser.parse_args(argv)
    if args.corpus is not None and not args.corpus.is_file():
        parser.error(f"--corpus {args.corpus}: no such file")
    if args.corpus is not None and args.invent:
        parser.error("--corpus and --invent: a corpus is for grounded queries; pick one")
    if not args.train_config.is_file():
        parser.error(f"--train-config {args.train_config}: no such file")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {' '.join(map(str, args.seeds))}: each seed once (the same seed trains the same model)")
    return args


def settings_of(args: argparse.Namespace) -> PipelineSettings:
    return PipelineSettings(
        train_config=args.train_config.absolute(), procs=args.procs,
        corpus=args.corpus.absolute() if args.corpus else None, queries_per_passage=args.queries_per_passage,
        max_passages=args.max_passages, query_kinds=args.query_kinds, relevance=args.relevance, round_trip_k=args.round_trip_k, invent=args.invent,
        synth_backend=args.synth_backend,
        generator=args.generator, synth_tasks=args.synth_tasks, synth_examples=args.synth_examples,
        synth_temperature=args.synth_temperature, synth_languages=args.synth_languages, synth_args=args.synth_arg,
        teacher=args.teacher, cross_encoder=args.cross_encoder, ranks=args.ranks, num_negatives=args.num_negatives,
        seeds=args.seeds, merge_scale=args.merge_scale)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    settings = settings_of(args)
    out = Path(args.out).absolute()
    try:
        inputs = [settings.train_config, settings.teacher, settings.cross_encoder, settings.corpus,
                  settings.generator if Path(settings.generator).is_dir() else None]
        check_output(out, inputs=inputs, kind=PIPELINE_KIND, continues=True)
    except OutputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run(Job(out, settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
