"""Where things live in a sentence-transformers folder that we write: facts shared by the
exporter that writes the folder, the model loader and the safety check that read it. Standard
library only, so every layer may know them without knowing each other."""

from __future__ import annotations

import json
from pathlib import Path

# The import path sentence-transformers records in modules.json for our latent-attention head.
LATENT_MODULE_TYPE = "llmembed.serve.st_modules.LatentAttentionPooling"


def pooling_weights_dir(export_dir: str | Path) -> Path | None:
    """The folder holding the latent-attention head's weights in an export, if it has one."""
    modules_file = Path(export_dir) / "modules.json"
    if not modules_file.is_file():
        return None
    for module in json.loads(modules_file.read_text()):
        if module.get("type") == LATENT_MODULE_TYPE:
            return Path(export_dir) / module["path"]
    return None
