"""Categories, sampled parameters and languages, read from ``taxonomy.yaml`` (data, not code)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

DEFAULT_TAXONOMY = Path(__file__).with_name("taxonomy.yaml")


@dataclass(frozen=True)
class Category:
    name: str
    brainstorm: bool
    params: tuple[str, ...]
    seed_tasks: tuple[str, ...] = ()


@dataclass
class Taxonomy:
    categories: dict[str, Category]
    parameters: dict[str, list]
    languages: dict[str, float]

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Taxonomy":
        path = Path(path) if path else DEFAULT_TAXONOMY
        if not path.is_file():
            raise FileNotFoundError(f"--taxonomy {path}: no such file")
        try:
            return cls._parse(yaml.safe_load(path.read_text(encoding="utf-8")), path)
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ValueError(f"--taxonomy {path}: not valid YAML ({str(err).splitlines()[0]})") from None
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"--taxonomy {path}: expected mappings 'parameters', 'categories' and 'languages' "
                             f"as in the built-in synth/taxonomy.yaml ({type(err).__name__}: {err})") from None

    @classmethod
    def _parse(cls, data: dict, path: Path) -> "Taxonomy":
        parameters = {k: list(v) for k, v in data["parameters"].items()}
        categories = {}
        for name, spec in data["categories"].items():
            unknown = [p for p in spec.get("params", []) if p not in parameters]
            if unknown:
                raise ValueError(f"{path}: category {name} uses undefined parameters {unknown}")
            categories[name] = Category(name, bool(spec.get("brainstorm", False)), tuple(spec.get("params", [])),
                                        tuple(spec.get("seed_tasks", [])))
        languages = {str(k): float(v) for k, v in data["languages"].items()}
        for required in ("English", "Chinese"):
            languages.setdefault(required, 1.0)
        return cls(categories, parameters, languages)

    def restrict(self, categories: list[str] | None, languages: list[str] | None) -> "Taxonomy":
        cats = self.categories
        if categories:
            unknown = sorted(set(categories) - set(cats))
            if unknown:
                raise ValueError(f"unknown categories {unknown}; known: {sorted(cats)}")
            cats = {k: v for k, v in cats.items() if k in categories}
        langs = self.languages
        if languages:
            langs = {l: self.languages.get(l, 1.0) for l in languages}
        return Taxonomy(cats, self.parameters, langs)
