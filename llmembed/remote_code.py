"""No code from a model folder unless the user asks for it.

transformers runs ``.py`` files shipped in a folder when one of its configs carries an
``auto_map`` and remote code is trusted; sentence-transformers imports any class a
``modules.json`` names, and a module's own folder (its ``path``) has configs of its own. A
crafted folder can hide either deep inside: in a module's subfolder, or behind a module path
that leads out of the folder. So every folder a command loads (a model, an export, a teacher, a
reranker, merge inputs, the folder verify checks) is read whole before anything loads it:

- every ``*config*.json`` anywhere under it (``config.json``, ``tokenizer_config.json``,
  ``adapter_config.json``, ``sentence_bert_config.json``...) must be free of ``auto_map``;
- every ``modules.json`` may name only sentence-transformers' own modules and the classes
  listed in :data:`OUR_MODULE_TYPES`, at paths inside the folder.

A folder that breaks either rule is refused in one line, unless the user passed
``--trust-remote-code`` (``trust_remote_code=True``). Standard library only (and the layout
facts of :mod:`llmembed.st_layout`).
"""

from __future__ import annotations

import json
from pathlib import Path

from llmembed.st_layout import LATENT_MODULE_TYPE

# Our own sentence-transformers modules: they are imported from the installed llmembed, never
# from the folder, so they are as safe as sentence-transformers' own.
OUR_MODULE_TYPES = (LATENT_MODULE_TYPE,)
_ST_PREFIX = "sentence_transformers."


class RemoteCodeError(ValueError):
    """A folder asks to run code of its own and the user did not allow it."""


def remote_code_requests(folder: str | Path) -> list[str]:
    """Every place under ``folder`` that would make a loader run code the folder chose, as
    one-line descriptions (empty: none)."""
    root = Path(folder).resolve()
    found = []
    for config in sorted(root.rglob("*config*.json")):
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue  # not a config a loader could read either
        if isinstance(data, dict) and "auto_map" in data:
            found.append(f"{config} asks to run code shipped with the model (auto_map)")
    for modules_file in sorted(root.rglob("modules.json")):
        try:
            modules = json.loads(modules_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            found.append(f"{modules_file}: not valid JSON")
            continue
        if not isinstance(modules, list):
            found.append(f"{modules_file}: not a list of modules")
            continue
        for module in modules:
            kind = module.get("type", "") if isinstance(module, dict) else ""
            if not isinstance(kind, str) or not (kind.startswith(_ST_PREFIX) or kind in OUR_MODULE_TYPES):
                found.append(f"{modules_file} names the module {kind!r}, which is neither sentence-transformers' "
                             "nor llmembed's: loading it runs code from outside them")
                continue
            path = module.get("path", "")
            target = (modules_file.parent / str(path)).resolve()
            if target != root and root not in target.parents:
                found.append(f"{modules_file} loads a module from {path!r}, outside the model folder")
    return found


def check_no_remote_code(folder: str | Path, trust_remote_code: bool = False) -> None:
    """Raise :class:`RemoteCodeError` naming the first request for remote code under
    ``folder``, unless ``trust_remote_code``."""
    if trust_remote_code or not Path(folder).is_dir():
        return
    found = remote_code_requests(folder)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise RemoteCodeError(f"{found[0]}{more}; not loading {folder}. Load it only if you trust that code: "
                              "pass --trust-remote-code (trust_remote_code=True)")
