"""The module layers are a contract (pyproject.toml, [tool.importlinter]): import-linter checks
it, a planted upward import breaks it, and no module imports itself in a circle."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from .train_utils import REPO

LINT = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("launch", "llmembed", "synth")


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT)], cwd=root, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(root), "PATH": str(LINT.parent)})


def test_the_import_contracts_hold():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_an_import_from_a_lower_layer_upwards_breaks_the_contract(tmp_path):
    """The model core importing the exporter (the circle this layering removed) is refused."""
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "configs"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    model = tmp_path / "llmembed" / "model.py"
    model.write_text(model.read_text() + "\nfrom llmembed.serve.export import export  # planted\n")
    result = _lint(tmp_path)
    assert result.returncode == 1 and "1 kept, 1 broken" in result.stdout, result.stdout[-3000:]
    assert "llmembed.model -> llmembed.serve.export" in result.stdout


def test_no_module_imports_itself_through_others():
    import grimp

    graph = grimp.build_graph(*PACKAGES)
    circles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            chain = graph.find_shortest_chain(importer=imported, imported=importer)
            if chain:
                circles.append(" -> ".join((importer, *chain)))
    assert not circles, circles
