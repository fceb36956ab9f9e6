"""synth building blocks: taxonomy, work items, templates, parsing, filters, storage."""

from __future__ import annotations

import json
import string

import pytest

from llmembed.data.schema import parse_record
from synth.filters import RecordFilter, normalise, shingles
from synth.parse import ParseError, parse_example, parse_tasks, to_record
from synth.pipeline import Pipeline, Settings
from synth.prompts import FIELDS, TEMPLATE_DIR, brainstorm_schema, example_schema, render
from synth.store import ShardStore
from synth.taxonomy import Taxonomy

EXAMPLES = {
    "short_long": {"user_query": "best hiking boots", "positive_document": "Our review of hiking boots ...",
                   "hard_negative_document": "Running shoes are light ..."},
    "long_short": {"input_text": "The movie was a delight from start to end.", "label": "positive",
                   "misleading_label": "negative"},
    "short_short": {"input": "how to boil eggs", "positive_document": "boiling eggs quickly"},
    "long_long": {"input": "A long abstract about graphs.", "positive_document": "Another abstract on graphs."},
    "sts": {"S1": "A cat sits on a mat.", "S2": "A cat is sitting on a rug.", "S3": "A dog runs in a park."},
    "bitext": {"S1": "Good morning", "S2": "早上好", "S3": "晚上好"},
}


def test_taxonomy_is_data_with_english_and_chinese():
    tax = Taxonomy.load()
    assert list(tax.categories) == ["short_long", "long_short", "short_short", "long_long", "sts", "bitext"]
    assert {"English", "Chinese"} <= set(tax.languages)
    assert tax.languages["English"] > tax.languages["Swedish"]
    assert tax.parameters["num_words"] == [50, 100, 200, 300, 400, 500]
    assert [c for c in tax.categories.values() if not c.brainstorm] == [tax.categories["sts"], tax.categories["bitext"]]
    with pytest.raises(ValueError, match="unknown categories"):
        tax.restrict(["poetry"], None)


def test_templates_put_fixed_text_first():
    for path in TEMPLATE_DIR.glob("*.txt"):
        text = path.read_text()
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f]
        assert fields, path
        first = min(text.index("{" + f) for f in fields)
        assert first > len(text) * 0.5, f"{path.name}: variable part starts too early"


def test_schemas_bound_every_string():
    for category in FIELDS:
        schema = example_schema(category)
        assert all("maxLength" in p for p in schema["properties"].values())
        assert schema["required"] == list(FIELDS[category])
    assert brainstorm_schema(5)["properties"]["tasks"]["maxItems"] == 5


def test_work_items_are_deterministic_and_sharded(tmp_path):
    settings = Settings(out=str(tmp_path), seed=7, num_tasks=3, examples_per_task=4, categories=["sts", "bitext"])
    items = Pipeline(settings, lambda: None).items({})
    again = Pipeline(settings, lambda: None).items({})
    assert items == again and len(items) == 2 * 3 * 4
    assert len({i["id"] for i in items}) == len(items)
    assert all(i["params"]["target_language"] != i["language"] for i in items if i["category"] == "bitext")
    other = Pipeline(Settings(out=str(tmp_path), seed=8, num_tasks=3, examples_per_task=4,
                              categories=["sts", "bitext"]), lambda: None).items({})
    assert [i["seed"] for i in other] != [i["seed"] for i in items]
    parts = [Pipeline(Settings(out=str(tmp_path), seed=7, num_tasks=3, examples_per_task=4,
                               categories=["sts", "bitext"], num_shards=3, shard_index=k), lambda: None).items({})
             for k in range(3)]
    assert sorted(i["id"] for p in parts for i in p) == sorted(i["id"] for i in items)


def test_render_fills_every_placeholder():
    messages = render("example_short_long", task="Find recipes", query_type="common", query_length="short",
                      clarity="clear", num_words=50, difficulty="college", language="English")
    assert messages[0]["role"] == "user" and "Find recipes" in messages[0]["content"]
    assert "{" not in messages[0]["content"]


@pytest.mark.parametrize("category", list(EXAMPLES))
def test_parse_and_map_every_category(category):
    fields = parse_example(json.dumps(EXAMPLES[category]), category)
    record = to_record(category, fields, "A task" if category not in ("sts", "bitext") else None, "English", {"id": "x"})
    parsed = parse_record(record)  # the trainer's reader accepts it unchanged
    assert parsed.query == record["query"] and parsed.instruction
    if category in ("short_short", "long_long"):
        assert parsed.negatives == []
    else:
        assert len(parsed.negatives) == 1


def test_parse_is_strict():
    with pytest.raises(ParseError) as err:
        parse_example('{"S1": "a", "S2": "b"', "sts")
    assert err.value.reason == "invalid_json"
    with pytest.raises(ParseError) as err:
        parse_example('{"S1": "a", "S2": "b"}', "sts")
    assert err.value.reason == "missing_field"
    with pytest.raises(ParseError) as err:
        parse_example('{"S1": "a", "S2": 3, "S3": "c"}', "sts")
    assert err.value.reason == "wrong_type"
    assert parse_example('```json\n{"S1": "a", "S2": "b", "S3": "c"}\n```', "sts")["S3"] == "c"
    assert parse_tasks('{"tasks": ["Find x", " ", "Find y"]}') == ["Find x", "Find y"]
    with pytest.raises(ParseError):
        parse_example("__import__('os')", "sts")


def _reason(parse, *args) -> str:
    with pytest.raises(ParseError) as err:
        parse(*args)
    return err.value.reason


def test_parse_enforces_the_decoding_schema():
    """The schema a request was decoded with also bounds what an unconstrained endpoint returns."""
    schema = example_schema("sts", max_chars=20)
    ok = {"S1": "A cat sits on a mat.", "S2": "A cat on a rug.", "S3": "A dog runs."}  # S1: exactly 20 chars
    assert parse_example(json.dumps(ok), "sts", schema) == ok
    assert _reason(parse_example, json.dumps(dict(ok, S2="A cat is sitting on a rug.")), "sts", schema) == "field_too_long"
    assert parse_example(json.dumps(dict(ok, S2="A cat is sitting on a rug.")), "sts")["S2"]  # the full-length default
    assert _reason(parse_example, json.dumps(dict(ok, S3=3)), "sts", schema) == "wrong_type"
    assert _reason(parse_example, json.dumps(dict(ok, S3=["A dog runs."])), "sts", schema) == "wrong_type"
    assert _reason(parse_example, json.dumps(dict(ok, S1="")), "sts", schema) == "field_too_short"
    assert _reason(parse_example, json.dumps(dict(ok, S4="extra")), "sts", schema) == "extra_field"
    assert _reason(parse_example, json.dumps({"S1": "a", "S2": "b"}), "sts", schema) == "missing_field"
    tasks = brainstorm_schema(2, max_chars=30)
    assert parse_tasks('{"tasks": ["Find recipes for a dish", "Match questions"]}', tasks) == [
        "Find recipes for a dish", "Match questions"]
    assert _reason(parse_tasks, '{"tasks": ["a", "b", "c"]}', tasks) == "too_many_items"
    assert _reason(parse_tasks, json.dumps({"tasks": ["Retrieve " + "x" * 22]}), tasks) == "field_too_long"
    assert _reason(parse_tasks, '{"tasks": "Find x"}') == "wrong_type"


def _rec(query, positive, negatives=("n",), task="short_long"):
    return {"query": query, "positive": positive, "negatives": list(negatives), "task": task}


def test_filters_count_every_reason(tmp_path):
    evals = tmp_path / "eval.txt"
    evals.write_text("the quick brown fox jumps over the lazy dog near the river bank today\n")
    f = RecordFilter(decontaminate=evals)
    assert f.check(_rec("", "p"), "a") == "empty_field"
    assert f.check(_rec("ab", "positive text"), "b") == "too_short"
    assert f.check(_rec("what is the boiling point of water", "The boiling point: what is the boiling point of water "
                        "at sea level? 100 C."), "c") == "query_copied_into_document"
    assert f.check(_rec("query one", "same text", ["Same text!"]), "d") == "positive_equals_negative"
    assert f.check(_rec("tell me", "the quick brown fox jumps over the lazy dog near the river bank"), "e") == "contaminated"
    good = _rec("how do volcanoes form", "Volcanoes form where magma rises through the crust and erupts at the surface.")
    assert f.check(good, "f") is None
    assert f.check(dict(good), "g") == "duplicate"
    same_normalised = _rec("how do volcanoes form?", "Volcanoes form where magma rises through the crust and erupts "
                           "at the surface!")
    assert f.check(same_normalised, "h") == "duplicate"
    other = _rec("why is the sea salty", "Rivers carry dissolved minerals into the oceans, where they accumulate.")
    assert f.check(other, "i") is None


def test_near_duplicate_paraphrase_reaches_minhash():
    """A reworded record, not equal after normalisation, with a high word-shingle Jaccard: only
    MinHash LSH can catch it."""
    f = RecordFilter()
    query = "how do volcanoes form"
    text = ("Volcanoes form where magma from the mantle rises through cracks in the crust, collects in a chamber "
            "below the surface and finally erupts as lava, ash and gas when the pressure becomes too high to hold.")
    reworded = text.replace("too high to hold.", "too high to hold back.")
    assert normalise(text) != normalise(reworded)
    a, b = shingles(f"{query} {text}"), shingles(f"{query} {reworded}")
    assert len(a & b) / len(a | b) > 0.95  # the filter's threshold is 0.85
    assert f.check(_rec(query, text), "a") is None
    assert f.check(_rec(query, reworded), "b") == "near_duplicate"
    other = _rec("what causes earthquakes", "Earthquakes happen when stress along a fault is released suddenly "
                 "and the rock on either side slips, sending seismic waves through the ground.")
    assert f.check(other, "c") is None


def test_store_writes_shards_once(tmp_path):
    store = ShardStore(tmp_path, "part000of001")
    assert not store.done(0)
    store.write(0, [{"query": "q"}], [{"id": "x"}], {"generated": 1})
    assert store.done(0) and store.records(0) == [{"query": "q"}]
    with pytest.raises(RuntimeError, match="never rewritten"):
        store.write(0, [], [], {})
    assert not list(tmp_path.rglob(".*"))  # no temp files left behind


def test_a_rerun_with_other_decoding_settings_is_refused(tmp_path):
    """--no-constrained (or another dtype or batch size) on a partial output would mix two
    kinds of generations under one manifest: the rerun is refused with the setting named."""
    import subprocess
    import sys

    base = dict(out=str(tmp_path), categories=["sts"], num_tasks=1, examples_per_task=1)
    first = Pipeline(Settings(**base, decoding={"constrained": True, "dtype": "auto", "batch_size": 8}), lambda: None)
    first.check_output_folder()
    first.write_manifest(complete=False)
    manifest = tmp_path / "manifest.json"
    before = manifest.read_text()
    other = Pipeline(Settings(**base, decoding={"constrained": False, "dtype": "auto", "batch_size": 8}), lambda: None)
    with pytest.raises(ValueError, match=r"other settings \(decoding\)"):
        other.check_output_folder()
    run = subprocess.run([sys.executable, "-m", "synth.generate", "--out", str(tmp_path), "--categories", "sts",
                          "--num-tasks", "1", "--examples-per-task", "1", "--no-constrained", "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "other settings (decoding)" in run.stderr and "Traceback" not in run.stderr
    assert manifest.read_text() == before
    # The same settings continue.
    Pipeline(Settings(**base, decoding={"constrained": True, "dtype": "auto", "batch_size": 8}),
             lambda: None).check_output_folder()


def test_a_second_synth_on_the_same_output_is_refused(tmp_path):
    """Two commands on one --out would write the same shards twice: the second is refused with
    the holder's PID, before it touches anything; the lock goes when the holder dies."""
    import subprocess
    import sys

    from tests.processes import kill_tree

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from llmembed import runlock; "
         "h = runlock.hold(__import__('pathlib').Path(sys.argv[1]), '.synth-part000of001.lock', 'synth run', ''); "
         "print('held', flush=True); time.sleep(300)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    command = [sys.executable, "-m", "synth.generate", "--out", str(tmp_path), "--categories", "sts",
               "--num-tasks", "1", "--examples-per-task", "1", "--no-progress"]
    try:
        assert holder.stdout.readline().strip() == "held"
        run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    finally:
        kill_tree(holder)
    assert run.returncode == 2, run.stderr
    assert f"is in use by another synth run (PID {holder.pid})" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "manifest.json").exists()
    # The OS released the killed holder's lock: no stale lock to clear by hand.
    from llmembed import runlock

    runlock.hold(tmp_path, ".synth-part000of001.lock", "synth run", "").close()


def _part(out, index: int, records: list[dict], complete: bool = True) -> None:
    pipeline = Pipeline(Settings(out=str(out), categories=["sts"], num_shards=2, shard_index=index), lambda: None)
    pipeline.store.write(0, records, [], {"generated": len(records)})
    pipeline.write_manifest(complete=complete, num_shards=1)


def _record(query: str, positive: str) -> dict:
    return {"query": query, "positive": positive, "negatives": [], "instruction": "Retrieve", "task": "short_long",
            "score": None, "meta": {}}


LONG = ("the committee approved the new budget for the city library after a long debate about opening hours "
        "staff numbers and the renovation of the reading rooms on the second floor")


def test_merge_removes_duplicates_across_parts_and_refuses_unfinished_parts(tmp_path):
    """Each data-parallel part filtered only its own records; the merge sees them all."""
    from synth.merge import main as merge_main
    from synth.merge import merge

    first = _record("library budget news", LONG)
    _part(tmp_path, 0, [first, _record("how tall is everest", "Mount Everest is 8,849 metres high.")])
    near = _record("library budget news", LONG + " today")
    _part(tmp_path, 1, [dict(first), _record("what do cats eat", "Cats eat meat."), near], complete=False)

    assert merge_main(["--out", str(tmp_path)]) == 2  # part 1 unfinished: refused, nothing written
    assert not (tmp_path / "merged").exists()
    with pytest.raises(ValueError, match=r"unfinished part\(s\) manifest.part001of002.json"):
        merge(tmp_path, tmp_path / "merged")
    stats = merge(tmp_path, tmp_path / "merged", heldout_share=0.5, allow_partial=True)
    assert stats["records_in"] == 5 and stats["removed"] == {"duplicate": 1, "near_duplicate": 1}
    kept = [json.loads(l) for name in ("train", "heldout")
            for l in (tmp_path / "merged" / f"{name}.jsonl").read_text().splitlines()]
    assert sorted(r["query"] for r in kept) == ["how tall is everest", "library budget news", "what do cats eat"]
    assert stats["train"] + stats["heldout"] == 3
    before = (tmp_path / "merged" / "train.jsonl").read_text()
    with pytest.raises(ValueError, match="pass --overwrite"):  # an earlier merge is replaced on request only
        merge(tmp_path, tmp_path / "merged", heldout_share=0.5, allow_partial=True)
    assert merge(tmp_path, tmp_path / "merged", heldout_share=0.5, allow_partial=True, overwrite=True) == stats
    assert (tmp_path / "merged" / "train.jsonl").read_text() == before  # deterministic
    # The merged folder is part of the output: synth still continues in this --out.
    Pipeline(Settings(out=str(tmp_path), categories=["sts"], num_shards=2, shard_index=0), lambda: None)


def test_merge_refuses_parts_of_another_run_and_incomplete_shard_sets(tmp_path):
    """Parts written with another seed (or model, temperature...) are not one data set, and a
    3-part run missing part 0 is not complete: both are named, nothing is written."""
    from synth.merge import merge

    def part(out, index, total, seed=0):
        pipeline = Pipeline(Settings(out=str(out), categories=["sts"], num_shards=total, shard_index=index,
                                     seed=seed), lambda: None)
        pipeline.store.write(0, [_record(f"query {index} of {total}", LONG)], [], {"generated": 1})
        pipeline.write_manifest(complete=True, num_shards=1)

    mixed = tmp_path / "mixed"
    part(mixed, 0, 2)
    part(mixed, 1, 2, seed=7)
    with pytest.raises(ValueError, match=r"manifest.part001of002.json: a run with other settings .* \(seed\)"):
        merge(mixed, mixed / "merged", allow_partial=True)

    incomplete = tmp_path / "incomplete"
    part(incomplete, 1, 3)
    part(incomplete, 2, 3)
    with pytest.raises(ValueError, match="2 of 3 parts have started, missing part000of003"):
        merge(incomplete, incomplete / "merged")

    stray = tmp_path / "stray"  # a shard of a 2-part run beside a 3-part run's parts
    for index in range(3):
        part(stray, index, 3)
    (stray / "shards" / "part000of002-00000.jsonl").write_text(json.dumps(_record("old", LONG)) + "\n")
    with pytest.raises(ValueError, match=r"part000of002-00000.jsonl: a shard of no run .*a 2-part one"):
        merge(stray, stray / "merged")
    assert not any((d / "merged").exists() for d in (mixed, incomplete, stray))
    (stray / "shards" / "part000of002-00000.jsonl").unlink()
    assert merge(stray, stray / "merged")["records_in"] == 3


def test_credentials_in_the_endpoint_url_reach_no_file_and_no_output(tmp_path, capsys):
    """A user name, password and query-string token in --base-url are used for the requests but
    blanked everywhere a run writes or prints."""
    import threading

    from synth.generate import main as generate_main

    from .test_synth_openai import ANSWER, Endpoint

    server = Endpoint(0, answers=[json.dumps(ANSWER)])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        url = f"http://alice:hunter2-pw@127.0.0.1:{port}/v1?api-key=tok-9f3e"
        out = tmp_path / "out"
        code = generate_main(["--out", str(out), "--backend", "openai", "--base-url", url, "--model", "m",
                              "--categories", "sts", "--num-tasks", "2", "--examples-per-task", "1", "--no-progress",
                              "--max-retries", "0"])
    finally:
        server.shutdown()
        server.server_close()
    assert code == 0 and server.headers  # the run talked to the server
    printed = capsys.readouterr()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and json.loads((out / "manifest.json").read_text())["backend"]["base_url"] == (
        f"http://***@127.0.0.1:{port}/v1?api-key=***")
    for secret in ("hunter2-pw", "tok-9f3e", "alice"):
        assert secret not in printed.out + printed.err
        assert not [p for p in files if secret.encode() in p.read_bytes()], secret
