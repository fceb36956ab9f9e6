"""launch/train.py as a user runs it: bad data and bad config give one clear line."""

from __future__ import annotations

import json

import pytest

from .train_utils import launch, metrics, write_config, write_pairs

pytestmark = pytest.mark.integration


def test_bad_record_stops_with_file_and_line_unless_skipped(tiny_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 40)
    with open(data, "ab") as f:
        f.write(b'{"query": "q", "positive": []}\n')
        f.write(b'{"query": "q", "positive": "p"\n')
        f.write(b'\xff\xfe\n')
    config = write_config(tmp_path, tiny_dir, [data], train={"max_steps": 2})
    run = launch(config, launcher="python", check=False)
    assert run.returncode == 2
    assert f"{data}:41: field 'positive': empty list" in run.stdout
    assert "Traceback" not in run.stdout
    run = launch(config, launcher="python", extra=["--skip-invalid"])
    assert "skipped 3 invalid record(s)" in run.stdout
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_records"] == 3


def test_unknown_config_key_is_refused(tiny_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 16)
    config = write_config(tmp_path, tiny_dir, [data])
    run = launch(config, launcher="python", extra=["--set", "train.learning_rate=1e-4"], check=False)
    assert run.returncode == 2 and "unknown key(s) train.learning_rate" in run.stdout
    run = launch(config, launcher="python", extra=["--set", "model.pooling.kind=cls"], check=False)
    assert run.returncode == 2 and "pooling.kind" in run.stdout and "Traceback" not in run.stdout


def test_qlora_trains_and_reloads(tiny_dir, tmp_path):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("needs bitsandbytes")
    from llmembed.model import EmbeddingModel

    data = write_pairs(tmp_path / "pairs.jsonl", 32)
    config = write_config(tmp_path, tiny_dir, [data], train={"max_steps": 3},
                          model={"backbone": {"quantization": "4bit"}})
    launch(config, launcher="python")
    losses = [m["loss"] for m in metrics(tmp_path / "run")]
    assert len(losses) == 3 and all(l == l for l in losses)
    model = EmbeddingModel.load(tmp_path / "run" / "final")
    assert model.config.backbone.quantization == "4bit"
    assert model.encode(["a question"], instruction="x").shape == (1, 64)


def test_false_negative_masking_is_counted_in_the_training_logs(tiny_dir, tmp_path):
    """With margin 0 every negative an untrained model scores above its positive leaves the
    loss; the count per step lands in metrics.jsonl (and TensorBoard beside it)."""
    data = write_pairs(tmp_path / "pairs.jsonl", 40)
    config = write_config(tmp_path, tiny_dir, [data], train={"max_steps": 3}, loss={"false_negative_margin": 0.0})
    launch(config, launcher="python")
    logged = metrics(tmp_path / "run")
    counts = [m["masked_negatives"] for m in logged]
    assert len(counts) == 3 and all(isinstance(c, int) and 0 <= c <= 4 * 8 for c in counts) and sum(counts) > 0


def _with_teacher(config, scores):
    import yaml

    tree = yaml.safe_load(config.read_text())
    tree["data"]["datasets"][0]["teacher_scores"] = scores
    config.write_text(yaml.safe_dump(tree))
    return config


def test_distillation_from_mined_teacher_scores_trains_and_unmined_data_is_refused(tiny_dir, tmp_path):
    """Negatives and scores from a real mining pass with the packaged all-MiniLM-L6-v2; the
    same first batch costs InfoNCE + KL with the teacher, InfoNCE alone without it."""
    from llmembed.data import read_jsonl
    from llmembed.serve.encoders import load_encoder, reference_model_dir
    from llmembed.mine import MineSettings, mine

    raw = write_pairs(tmp_path / "pairs.jsonl", 40)
    records = [r for r in read_jsonl(raw)]
    corpus = list(dict.fromkeys(t for r in records for t in r.positives + r.negatives))
    mined, _ = mine(records, corpus, load_encoder(reference_model_dir()), MineSettings(0, 20, 3))
    data = tmp_path / "mined.jsonl"
    data.write_text("".join(json.dumps(r.to_json()) + "\n" for r in mined))
    first = {}
    for name, scores in (("plain", None), ("taught", "embedding")):
        folder = tmp_path / name
        folder.mkdir()
        config = _with_teacher(write_config(folder, tiny_dir, [data], train={"max_steps": 2},
                                            loss={"distill_weight": 1.0, "teacher_temperature": 0.05}), scores)
        launch(config, launcher="python")
        first[name] = metrics(folder / "run")[0]["loss"]
    assert first["taught"] > first["plain"] + 1e-4  # KL >= 0, and this teacher is not the student
    config = _with_teacher(write_config(tmp_path, tiny_dir, [raw], train={"max_steps": 1}), "embedding")
    run = launch(config, launcher="python", check=False)
    assert run.returncode == 2 and "record 1 (query 'tell me about the" in run.stdout
    assert "meta.mining.positive_score is missing" in run.stdout and "Traceback" not in run.stdout


def test_structure_distillation_from_the_packaged_encoder_trains(tiny_dir, tmp_path):
    """The packaged all-MiniLM-L6-v2 as a live teacher: the first step's loss gains the MSE of
    the two models' cosine matrices (>= 0, and this teacher is not the student)."""
    from llmembed.serve.encoders import reference_model_dir

    data = write_pairs(tmp_path / "pairs.jsonl", 40)
    first = {}
    for name, weight in (("plain", 0.0), ("taught", 5.0)):
        folder = tmp_path / name
        folder.mkdir()
        loss = {"teacher_model": str(reference_model_dir()), "structure_weight": weight}
        launch(write_config(folder, tiny_dir, [data], train={"max_steps": 2}, loss=loss), launcher="python")
        first[name] = metrics(folder / "run")[0]["loss"]
    assert first["taught"] > first["plain"] + 1e-4


def test_two_stages_chain_their_models_and_a_rerun_skips_finished_stages(tiny_dir, tmp_path):
    """Stage 2 starts from stage 1's final weights: with a vanishing learning rate it ends
    where stage 1 ended, not at the untrained model. A rerun finds both stages done."""
    import numpy as np
    import yaml

    from llmembed.model import EmbeddingModel

    data = write_pairs(tmp_path / "pairs.jsonl", 40)
    config = write_config(tmp_path, tiny_dir, [data], train={"max_steps": 3, "lr": 5e-3},
                          model={"pooling": {"kind": "mean"}})
    tree = yaml.safe_load(config.read_text())
    tree["stages"] = [{"name": "weak", "data": {"group_size": 1}},
                      {"name": "hard", "train": {"lr": 1e-12, "max_steps": 1, "warmup_steps": 0}}]
    config.write_text(yaml.safe_dump(tree))
    run = launch(config, launcher="python")
    assert "stage weak ->" in run.stdout and "stage hard ->" in run.stdout
    texts = ["tell me about the piano", "This passage describes the river in detail."]
    weak = EmbeddingModel.load(tmp_path / "run" / "weak" / "final").encode(texts)
    hard = EmbeddingModel.load(tmp_path / "run" / "hard" / "final").encode(texts)
    fresh = EmbeddingModel.build(EmbeddingModel.load(tmp_path / "run" / "weak" / "final").config).encode(texts)
    assert (weak * hard).sum(1).min() >= 0.9999
    assert (weak * fresh).sum(1).min() < 0.999  # stage 1 really trained, so the match above means something
    assert np.isfinite(hard).all()
    again = launch(config, launcher="python")
    assert "stage weak: finished before, skipped" in again.stdout and "stage hard: finished before, skipped" in again.stdout
    # A later stage whose model serves differently cannot start from the earlier one.
    tree["stages"][1]["model"] = {"pooling": {"kind": "last_token"}}
    tree["stages"][1]["name"] = "other"
    config.write_text(yaml.safe_dump(tree))
    bad = launch(config, launcher="python", check=False)
    assert bad.returncode == 2 and "stage other: train.init_from" in bad.stdout and "serves differently" in bad.stdout


def test_simcse_trains_on_packaged_wikipedia_sentences_and_needs_dropout(tiny_dir, tmp_path):
    """Unsupervised SimCSE on the Wikipedia sentences gensim ships: the dataset's loss is chosen
    from its {"text"} records; with LoRA dropout the two views differ and training lowers the
    loss; without any dropout the run is refused in one line before it starts."""
    from llmembed.data.packaged import wikipedia_sentences

    sentences = wikipedia_sentences()
    assert len(sentences) > 10_000 and "Anarchism is a political philosophy" in sentences[0]
    data = tmp_path / "sentences.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences[:256]))
    config = write_config(tmp_path, tiny_dir, [data], model={"lora": {"r": 8, "dropout": 0.1}},
                          train={"max_steps": 12, "lr": 3e-3, "per_device_batch_size": 16})
    launch(config, launcher="python")
    logged = metrics(tmp_path / "run")
    losses = [m["loss"] for m in logged]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["data"]["datasets"][0]["loss"] == "auto"
    refused = write_config(tmp_path / "run", tiny_dir, [data], model={"lora": {"r": 8, "dropout": 0.0}},
                           train={"max_steps": 1}, checkpoint={"output_dir": str(tmp_path / "refused")})
    run = launch(refused, launcher="python", check=False)
    assert run.returncode == 2 and "trains SimCSE, whose two views differ only by dropout" in run.stdout
    assert "Traceback" not in run.stdout


def test_mntp_then_simcse_stages_adapt_a_bidirectional_model_and_causal_mntp_is_refused(tiny_dir, tmp_path):
    """LLM2Vec's order as two stages: MNTP on Wikipedia sentences (masked-token loss falls),
    then SimCSE starting from it. MNTP on a causal model is refused in one line."""
    import yaml

    from llmembed.data.packaged import wikipedia_sentences

    data = tmp_path / "sentences.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in wikipedia_sentences()[:256]))
    # Full fine-tuning: SimCSE's views then come from attention dropout.
    config = write_config(tmp_path, tiny_dir, [data], model={"backbone": {"bidirectional": True,
                                                                          "attention_dropout": 0.1}},
                          train={"lr": 1e-2, "per_device_batch_size": 16})
    tree = yaml.safe_load(config.read_text())
    tree["model"]["lora"] = None
    tree["stages"] = [{"name": "mntp", "data": {"datasets": [{"path": str(data), "loss": "mntp"}]},
                       "train": {"max_steps": 10}},
                      {"name": "simcse", "train": {"max_steps": 2}}]
    config.write_text(yaml.safe_dump(tree))
    launch(config, launcher="python")
    losses = [m["loss"] for m in metrics(tmp_path / "run" / "mntp")]
    # ln(49152) = 10.8 at first; through a frozen random output layer the tiny model learns
    # slowly (about -0.15 in 10 steps here, seeded).
    assert len(losses) == 10 and losses[0] > 5 and sum(losses[-3:]) / 3 < losses[0] - 0.1, losses
    assert len(metrics(tmp_path / "run" / "simcse")) == 2
    assert (tmp_path / "run" / "simcse" / "final").is_dir()
    causal = write_config(tmp_path / "run", tiny_dir, [data], train={"max_steps": 1},
                          checkpoint={"output_dir": str(tmp_path / "causal")})
    tree = yaml.safe_load(causal.read_text())
    tree["data"]["datasets"][0]["loss"] = "mntp"
    causal.write_text(yaml.safe_dump(tree))
    run = launch(causal, launcher="python", check=False)
    assert run.returncode == 2 and "set model.backbone.bidirectional: true" in run.stdout
    assert "Traceback" not in run.stdout


def test_grad_cache_with_structure_distillation_and_matryoshka_equals_the_plain_step(tiny_dir, tmp_path):
    """GradCache (chunks of 3 of 8 queries) under the live teacher's listwise KL and a Matryoshka
    loss: step by step the plain step's losses and gradient norms; the trained widths land in
    the saved model's serving contract."""
    from llmembed.serve.encoders import reference_model_dir
    from llmembed.model import EmbeddingModel

    data = write_pairs(tmp_path / "pairs.jsonl", 40)
    runs = {}
    for name, chunk in (("plain", None), ("cached", 3)):
        folder = tmp_path / name
        folder.mkdir()
        loss = {"teacher_model": str(reference_model_dir()), "structure_weight": 3.0, "structure_kind": "kl",
                "teacher_temperature": 0.05, "matryoshka_dims": [16, 64], "grad_cache_chunk": chunk}
        config = write_config(folder, tiny_dir, [data], loss=loss, train={"max_steps": 3, "per_device_batch_size": 8})
        launch(config, launcher="python")
        runs[name] = metrics(folder / "run")
    assert [m["step"] for m in runs["cached"]] == [1, 2, 3]
    for a, b in zip(runs["cached"], runs["plain"], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * b["grad_norm"]
    assert EmbeddingModel.load(tmp_path / "cached" / "run" / "final").contract.matryoshka_dims == [16, 64]
    bad = write_config(tmp_path, tiny_dir, [data], loss={"matryoshka_dims": [16, 128]}, train={"max_steps": 1})
    run = launch(bad, launcher="python", check=False)
    assert run.returncode == 2 and "exceed the embedding width 64" in run.stdout and "Traceback" not in run.stdout
