"""bench/data_scale.py at a small size: it writes its table, and the store's warm start holds a
fraction of what reading every record into Python holds, without parsing again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_the_data_scale_bench_writes_its_table_and_the_warm_start_holds_little(tmp_path):
    out = tmp_path / "data_scale.md"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "data_scale.py"), "--sizes", "20000", "--work",
                          str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True, timeout=600,
                         cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {cells[2]: cells for cells in (line.split(" | ") for line in out.read_text().splitlines()
                                          if line.startswith("| 20,000"))}
    assert set(rows) == {"today's reader (read_jsonl + lengths)", "store, cold (parse + lengths)", "store, warm"}
    reader, warm = rows["today's reader (read_jsonl + lengths)"], rows["store, warm"]
    # Columns: records, MB, path, load s, lengths s, ready s, private MiB, per 1M, mapped MiB.
    assert float(warm[6].replace(",", "")) * 10 < float(reader[6].replace(",", ""))
    assert float(warm[5]) < 1.0  # nothing parsed or counted again
    assert float(warm[8].strip(" |").replace(",", "")) > 0  # the records are read from the mapped table
