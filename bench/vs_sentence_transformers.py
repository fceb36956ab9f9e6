"""Our trainer side by side with sentence-transformers' on the same work, on this machine's CPU.

    .venv/bin/python bench/vs_sentence_transformers.py [--steps 24] [--rounds 2] [--batch 8]

Same model (the built-in default SmolLM2-135M-Instruct with LoRA r16, mean pooling, normalised),
same inputs (sentence-transformers loads our export of the untrained model: plain text, no chat
template, the same prompt and cut, so every pair is the same tokens on both sides; checked on
the first 256 pairs before anything trains, and the real tokens per pair of each run are in the
table), same data (the packaged chatterbot training pairs: question -> answer, in-batch negatives),
same batch size, the same 64-token cut, the same E5-style instruction on queries, the same
temperature (scale 20), learning rate and schedule, the same number of steps, one process.
Runs, each a fresh process, are interleaved (each of our setups, ST MNRL, ST cached MNRL; then
again) so machine noise hits all of them.

Reported per run: samples/s and tokens/s after the first two steps, the share of processed
tokens that were padding, the process's peak RSS; per setup, the offline suite's scores of the
first round's model. Writes a markdown table (``--out``, default
``bench/results/vs_sentence_transformers.md``) and, with matplotlib installed, a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import REPO, rates, run, save_plot, write_table  # noqa: E402

INSTRUCTION = "Given a question, retrieve the answer to it"
QUERY_PROMPT = f"Instruct: {INSTRUCTION}\nQuery: "  # our query template with that instruction
MAX_LENGTH = 64
LR = 5e-4
# Ours: "packed" draws the same batches as ST (no length grouping) and runs them padding-free;
# "2 length buckets" the same batches in two padded passes per side; "length-grouped" other,
# length-sorted batches (less contrast per batch).
OURS = {
    "ours, packed": dict(grouped=False, buckets=1, pack_tokens=512),
    "ours, 2 length buckets": dict(grouped=False, buckets=2, pack_tokens=None),
    "ours, padded": dict(grouped=False, buckets=1, pack_tokens=None),
    "ours, length-grouped + 2 buckets": dict(grouped=True, buckets=2, pack_tokens=None),
}
SETUPS = (*OURS, "ST MNRL", "ST CachedMNRL")


def ours_overrides(grouped: bool, buckets: int, pack_tokens: int | None) -> list[str]:
    settings = [
        "model.pooling.kind=mean", "model.lora={r: 16, alpha: 32, dropout: 0.0}",
        f"data.query_max_length={MAX_LENGTH}", f"data.passage_max_length={MAX_LENGTH}",
        "loss.temperature=0.05", f"train.lr={LR}", "train.warmup_ratio=0.1", "train.schedule=linear",
        f"data.group_by_length={str(grouped).lower()}", f"train.length_buckets={buckets}",
        f"train.pack_tokens={'null' if pack_tokens is None else pack_tokens}",
    ]
    return [x for s in settings for x in ("--set", s)]


def plain_text_models(work: Path) -> tuple[Path, Path]:
    """The untrained default model saved by llmembed, and its export, which sentence-transformers
    loads as plain text (the export drops the chat template ST would otherwise wrap every text
    in) with our query prompt and the bench's cut."""
    from llmembed import BackboneConfig, EmbeddingModel, EmbeddingModelConfig, PoolingConfig, PromptConfig
    from llmembed.serve.export import export

    ours, theirs = work / "untrained", work / "untrained-st"
    config = EmbeddingModelConfig(backbone=BackboneConfig("default"), pooling=PoolingConfig(kind="mean"),
                                  prompts=PromptConfig(default_instruction=INSTRUCTION), max_length=MAX_LENGTH)
    EmbeddingModel.build(config).save(ours)
    export(ours, theirs, verify=False)
    return ours, theirs


def tokens_per_pair(ours: Path, theirs: Path, data: Path, pairs: int = 256) -> tuple[float, float]:
    """Mean real tokens of a (query, positive) pair as each side tokenises the first ``pairs``
    pairs; the bench refuses to run when they differ."""
    from sentence_transformers import SentenceTransformer

    from llmembed import EmbeddingModel

    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()][:pairs]
    queries = [r["query"] for r in rows]
    passages = [r["positive"] if isinstance(r["positive"], str) else r["positive"][0] for r in rows]
    tokenizer = EmbeddingModel.load(ours).text_tokenizer
    own = (tokenizer(queries, INSTRUCTION, is_query=True, max_length=MAX_LENGTH)["attention_mask"].sum()
           + tokenizer(passages, is_query=False, max_length=MAX_LENGTH)["attention_mask"].sum())
    st = SentenceTransformer(str(theirs), device="cpu")
    other = (st.preprocess([QUERY_PROMPT + q for q in queries])["attention_mask"].sum()
             + st.preprocess(passages)["attention_mask"].sum())
    return float(own) / len(rows), float(other) / len(rows)


def train_st(start: Path, data: Path, out: Path, steps: int, batch: int, cached: bool) -> None:
    """One sentence-transformers run (in this process) from the export ``start``; writes
    ``out/metrics.json``."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator
    from sentence_transformers.sentence_transformer.losses import (CachedMultipleNegativesRankingLoss,
                                                                   MultipleNegativesRankingLoss)
    from transformers import TrainerCallback

    torch.manual_seed(42)
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    dataset = Dataset.from_dict({"anchor": [r["query"] for r in rows],
                                 "positive": [r["positive"] if isinstance(r["positive"], str) else r["positive"][0]
                                              for r in rows]})
    model = SentenceTransformer(str(start), device="cpu")  # our export: plain text, mean pooling, normalised
    model.add_adapter(LoraConfig(task_type=TaskType.FEATURE_EXTRACTION, r=16, lora_alpha=32, lora_dropout=0.0,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"]))
    loss = (CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=max(1, batch // 2)) if cached
            else MultipleNegativesRankingLoss(model, scale=20.0))
    counts = {"padded": 0, "real": 0}

    def counting(texts, *args, **kwargs):  # the tokens each batch really runs
        features = model.preprocess(texts, *args, **kwargs)
        mask = features["attention_mask"]
        counts["padded"] += mask.numel()
        counts["real"] += int(mask.sum())
        return features

    marks: list[tuple[int, float, int, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append((state.global_step, time.perf_counter(), counts["padded"], counts["real"]))

    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"), max_steps=steps, per_device_train_batch_size=batch, learning_rate=LR,
        warmup_steps=0.1, lr_scheduler_type="linear", logging_steps=1, save_strategy="no", report_to=[],
        prompts={"anchor": QUERY_PROMPT}, dataloader_drop_last=True, seed=42, use_cpu=True,
        disable_tqdm=True)
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=dataset, loss=loss, callbacks=[Clock()],
        data_collator=SentenceTransformerDataCollator(preprocess_fn=counting, prompts=args.prompts))
    trainer.train()
    model.save(str(out / "final"))
    (_, t0, p0, r0), (_, t1, p1, r1) = marks[1], marks[-1]
    samples = (marks[-1][0] - marks[1][0]) * batch
    (out / "metrics.json").write_text(json.dumps({
        "samples_per_s": samples / (t1 - t0), "tokens_per_s": (p1 - p0) / (t1 - t0),
        "padding_share": 1 - (r1 - r0) / max(p1 - p0, 1), "real_tokens_per_sample": (r1 - r0) / samples}))


def run_st(start: Path, data: Path, out: Path, steps: int, batch: int, cached: bool) -> tuple[dict, float]:
    """``train_st`` in a fresh process; returns its metrics and peak RSS (GiB)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--st-run", str(start), str(data), str(out), str(steps), str(batch),
           str(int(cached))]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryFile(mode="w+") as stderr:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status):
            stderr.seek(0)
            raise SystemExit(f"sentence-transformers run failed:\n{stderr.read()[-3000:]}")
    return json.loads((out / "metrics.json").read_text()), usage.ru_maxrss / 2**20


def suite_scores(folder: Path, json_out: Path) -> dict[str, float]:
    subprocess.run([sys.executable, "-m", "llmembed.evaluate", "--model", str(folder), "--suite", "offline",
                    "--json", str(json_out)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=dict(os.environ, HF_HUB_OFFLINE="1"))
    scores = json.loads(json_out.read_text())["scores"]
    (row,) = scores.values()
    return {task: next(iter(values.values())) for task, values in row.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--no-quality", action="store_true", help="skip the offline-suite scores")
    parser.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS), metavar="SETUP",
                        help=f"a subset of {SETUPS} (must include 'ST MNRL', the reference)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "vs_sentence_transformers.md")
    parser.add_argument("--st-run", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.st_run:
        start, data, out, steps, batch, cached = args.st_run
        train_st(Path(start), Path(data), Path(out), int(steps), int(batch), cached == "1")
        return 0
    if "ST MNRL" not in args.setups:
        parser.error("--setups must include 'ST MNRL', the reference")
    setups = [s for s in SETUPS if s in args.setups]
    results: dict[str, list[tuple[float, float, float, float]]] = {s: [] for s in setups}
    finals: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="llmembed-bench-") as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, "-m", "llmembed.data.packaged", "chatterbot", "--out", str(work / "data")],
                       check=True, stdout=subprocess.DEVNULL)
        data = work / "data" / "train.jsonl"
        ours_start, st_start = plain_text_models(work)
        own_tokens, st_tokens = tokens_per_pair(ours_start, st_start, data)
        if own_tokens != st_tokens:
            raise SystemExit(f"unequal inputs: {own_tokens:.2f} real tokens per pair here, {st_tokens:.2f} in "
                             "sentence-transformers")
        print(f"inputs: {own_tokens:.2f} real tokens per pair on both sides (first 256 pairs)", flush=True)
        for round_ in range(args.rounds):
            for setup in setups:
                name = f"r{round_}-{SETUPS.index(setup)}"
                if setup in OURS:
                    extra = ours_overrides(**OURS[setup]) + ["--set", f"train.per_device_batch_size={args.batch}"]
                    rows, peak = run(args.batch, args.steps, 1, data, work, extra, name)
                    samples, tokens = rates(rows)
                    padding = rows[-1]["padding_share"]  # every step's processed tokens
                    processed = rows[-1]["tokens_per_s"] * rows[-1]["elapsed_s"]
                    real = processed * (1 - padding) / (rows[-1]["step"] * args.batch)
                    final = work / name / "final"
                else:
                    metrics, peak = run_st(st_start, data, work / name, args.steps, args.batch,
                                           setup == "ST CachedMNRL")
                    samples, tokens, padding = metrics["samples_per_s"], metrics["tokens_per_s"], metrics["padding_share"]
                    real = metrics["real_tokens_per_sample"]
                    final = work / name / "final"
                results[setup].append((samples, tokens, padding, peak, real))
                finals.setdefault(setup, final)
                print(f"round {round_ + 1}: {setup:<32} {samples:6.2f} samples/s {tokens:8.1f} tokens/s "
                      f"padding {padding:5.1%} real tokens/sample {real:5.1f} peak RSS {peak:5.2f} GiB", flush=True)
        quality = {} if args.no_quality else {s: suite_scores(finals[s], work / f"scores-{i}.json")
                                              for i, s in enumerate(setups)}
    write_report(args, results, quality, own_tokens)
    return 0


def write_report(args, results, quality, tokens_per_pair_both: float) -> None:
    mnrl = statistics.mean(r[0] for r in results["ST MNRL"])
    tasks = sorted({t for scores in quality.values() for t in scores})
    head = ("| setup | samples/s | tokens/s | padding | real tokens/sample | peak RSS GiB | vs ST MNRL |"
            + "".join(f" {t} |" for t in tasks))
    lines = [f"Same work on {os.cpu_count()} CPU cores, one process: built-in default + LoRA r16, mean pooling, "
             f"packaged chatterbot pairs, batch {args.batch}, {MAX_LENGTH}-token cut, E5 instruction on queries, "
             f"scale 20, lr {LR}, {args.steps} steps; rates after step 2; {args.rounds} interleaved rounds (each "
             "value listed); suite scores of the first round's models. Equal inputs: sentence-transformers "
             f"loads our export of the untrained model (plain text, no chat template); both sides tokenise the "
             f"first 256 pairs to {tokens_per_pair_both:.2f} real tokens per pair. Real tokens per sample of a "
             "run differ only by the batches each side draws.", "", head,
             "|" + "---|" * (7 + len(tasks))]
    for setup, values in results.items():
        speed = statistics.mean(v[0] for v in values)
        row = (f"| {setup} | {' / '.join(f'{v[0]:.2f}' for v in values)} | "
               f"{' / '.join(f'{v[1]:.0f}' for v in values)} | {statistics.mean(v[2] for v in values):.1%} | "
               f"{statistics.mean(v[4] for v in values):.1f} | {max(v[3] for v in values):.2f} | {speed / mnrl:.2f}x |")
        row += "".join(f" {quality[setup][t]:.4f} |" for t in tasks) if quality else ""
        lines.append(row)
    plt = write_table(args.out, lines)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(results)
    ax.barh(names, [statistics.mean(v[0] for v in results[n]) for n in names])
    for i, n in enumerate(names):
        for v in results[n]:
            ax.plot(v[0], i, "k.")
    ax.set(xlabel="samples/s (bar: mean; dots: rounds)", title="training throughput, same work, CPU")
    ax.invert_yaxis()
    save_plot(fig, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
