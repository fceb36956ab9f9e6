"""Length-grouped batches (data.group_by_length): the same rows per pass as plain sampling, a
pure function of seed and step, and a quickstart epoch with little padding, measured with the
real tokenizer and collator on the packaged chatterbot pairs."""

from __future__ import annotations

import numpy as np
import pytest

from llmembed.data.sampling import HomogeneousBatchSampler


def _lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(1, 200, n), rng.integers(1, 40, n)], axis=1)


def test_grouped_batches_are_a_pure_function_of_seed_and_step_and_cover_each_pass_once():
    lengths = _lengths(300)
    grouped = HomogeneousBatchSampler([300], [1.0], 8, seed=3, lengths=[lengths], window=32)
    again = HomogeneousBatchSampler([300], [1.0], 8, seed=3, lengths=[lengths], window=32)
    steps = grouped.steps_per_epoch
    first = [ref.indices for _, ref in zip(range(3 * steps), grouped.batches())]
    assert first == [ref.indices for _, ref in zip(range(3 * steps), again.batches())]
    assert first[steps + 5:] == [ref.indices for _, ref in zip(range(2 * steps - 5), grouped.batches(steps + 5))]
    epoch = [i for rows in first[:steps] for i in rows]
    assert len(epoch) == len(set(epoch)) == steps * 8  # every batch distinct rows, none twice in a pass
    assert first[:steps] != first[steps:2 * steps]  # another epoch, other batches
    # Rank slices of the same global batches: 2 ranks x 4 == 1 process x 8.
    ranks = [HomogeneousBatchSampler([300], [1.0], 8, seed=3, rank=r, world_size=2, lengths=[lengths], window=32)
             for r in range(2)]
    for one, zero_ref, one_ref in zip(first[:20], ranks[0].batches(), ranks[1].batches()):
        assert zero_ref.indices + one_ref.indices == one

    def spread(batches, column):  # mean range of a length within a batch
        return np.mean([np.ptp(lengths[list(rows), column]) for rows in batches])

    plain = [r.indices for _, r in zip(range(steps), HomogeneousBatchSampler([300], [1.0], 8, seed=3).batches())]
    assert spread(first[:steps], 0) < spread(plain, 0) / 4  # passages: sorted in windows of 32 batches
    assert spread(first[:steps], 1) < spread(plain, 1) / 2  # queries: then in runs of 4 batches


def test_lengths_must_match_the_datasets():
    with pytest.raises(ValueError, match="one length per record"):
        HomogeneousBatchSampler([300], [1.0], 8, lengths=[_lengths(299)])


@pytest.fixture(scope="module")
def chatterbot(module_tmp):
    import subprocess
    import sys

    out = module_tmp("chatterbot")
    subprocess.run([sys.executable, "-m", "llmembed.data.packaged", "chatterbot", "--out", str(out)], check=True,
                   capture_output=True)
    return out / "train.jsonl"


def _padding(config_path: str, data, overrides: list[str], pack_tokens: int = 256) -> tuple[float, float, float]:
    """Padding share of one epoch of the config's batches: one padded forward per side, with
    the step's length buckets (train.length_buckets), and packed (rows of ``pack_tokens``,
    filler counted as padding)."""
    from llmembed.backbone import load_tokenizer, resolve_backbone_path
    from llmembed.data.collate import ContrastiveCollator
    from llmembed.data.sampling import record_lengths
    from llmembed.packing import packed_size
    from llmembed.tokenization import EmbeddingTokenizer
    from llmembed.train.config import load_config
    from llmembed.train.setup import load_datasets
    from llmembed.train.step import length_buckets

    config = load_config(config_path, [f"data.datasets=[{{path: {data}}}]", *overrides])
    datasets, _ = load_datasets(config, False)
    tokenizer = EmbeddingTokenizer(load_tokenizer(resolve_backbone_path(config.model.backbone.name_or_path)),
                                   config.model.contract())
    collate = ContrastiveCollator(tokenizer, datasets, seed=config.train.seed,
                                  query_max_length=config.data.query_max_length,
                                  passage_max_length=config.data.passage_max_length)
    lengths = [record_lengths(d.records, tokenizer.count_tokens, config.data.passage_max_length,
                              config.data.query_max_length) for d in datasets] if config.data.group_by_length else None
    sampler = HomogeneousBatchSampler([len(d.records) for d in datasets], [1.0], config.train.per_device_batch_size,
                                      seed=config.train.seed, lengths=lengths, window=config.data.length_window)
    padded = bucketed = packed = real = 0
    for _, ref in zip(range(sampler.steps_per_epoch), sampler.batches()):
        batch = collate(ref)
        for side in ("query", "passage"):
            rows = batch[side]["attention_mask"].sum(dim=1)
            padded += len(rows) * int(rows.max())
            real += int(rows.sum())
            bucketed += sum(len(g) * int(rows[g].max()) for g in length_buckets(rows, config.train.length_buckets))
            packed += packed_size(batch[side]["attention_mask"], pack_tokens)
    return 1 - real / padded, 1 - real / bucketed, 1 - real / packed


def test_grouping_and_buckets_bring_a_quickstart_epoch_to_at_most_a_tenth_padding(chatterbot):
    config = "launch/configs/quickstart.yaml"
    buckets = ["train.pack_tokens=null", "train.length_buckets=2"]
    plain, bucketed, packed = _padding(config, chatterbot, ["data.group_by_length=false", *buckets])
    grouped, both, _ = _padding(config, chatterbot, ["data.group_by_length=true", *buckets])
    assert plain > 0.4  # ungrouped chatterbot batches carry a large share of padding
    assert bucketed < 0.2 and grouped < plain / 2
    assert both <= 0.10, (plain, bucketed, grouped, both)
    # The quickstart's own setting: the same batches (no grouping), packed into rows of 256 tokens.
    from llmembed.train.config import load_config

    assert load_config(config).train.pack_tokens == 256
    assert packed <= 0.10, (plain, packed)
    print(f"padding of a quickstart epoch: plain {plain:.1%}, 2 buckets {bucketed:.1%}, grouped {grouped:.1%}, "
          f"grouped + 2 buckets {both:.1%}, packed (256) {packed:.1%}")
