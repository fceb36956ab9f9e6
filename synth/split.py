"""A held-out split of relabelled queries by passage.

With your own documents the synthetic pairs are the only test there is; holding out queries
at random would test on passages the model trained on (another query's positive). Instead a
share of the passages is held out with every query whose (relabelled) positive it is, so no
held-out positive is ever a training positive. Which passages are held out depends only on
their ids (a hash), so reruns and added queries keep the split.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from llmembed.data.readers import json_lines_with_text
from llmembed.data.schema import DataError
from llmembed.outputs import write_text

HELDOUT_PASSAGES = 0.1


def held_out(passage_id: str, share: float = HELDOUT_PASSAGES) -> bool:
    """Whether a passage belongs to the held-out share (a hash of its id)."""
    return int(hashlib.sha256(f"heldout:{passage_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < share


def split_by_passage(source: Path, train: Path, heldout: Path, share: float = HELDOUT_PASSAGES) -> tuple[int, int]:
    """Write ``source``'s records (``synth.relabel`` output, ``meta.relabel.positive_passage_id``
    on each) to ``train`` or ``heldout`` by their positive's passage; returns both counts."""
    kept: dict[str, list[str]] = {"train": [], "heldout": []}
    for number, line, record in json_lines_with_text(source):
        try:
            passage = record["meta"]["relabel"]["positive_passage_id"]
        except (KeyError, TypeError):
            raise DataError(f"{source}:{number}: field 'meta.relabel.positive_passage_id': missing (write the records "
                            "with synth.relabel)") from None
        kept["heldout" if held_out(str(passage), share) else "train"].append(line)
    write_text(train, "".join(line + "\n" for line in kept["train"]))
    write_text(heldout, "".join(line + "\n" for line in kept["heldout"]))
    print(f"synthetic pairs: {len(kept['train'])} train, {len(kept['heldout'])} held out")
    return len(kept["train"]), len(kept["heldout"])
