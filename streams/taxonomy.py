"""The label taxonomy, read once from ``configs/labels.json`` (its only home)."""

from __future__ import annotations

import importlib.resources
import json
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel


def package_folder(package: str) -> Path:
    """A data folder shipped as a package (``configs``, ``recordings``): found with
    importlib.resources, so a wheel or ``pip install .`` works, not only the source tree."""
    try:
        return Path(str(importlib.resources.files(package)))
    except (ModuleNotFoundError, TypeError):
        # An editable install made before these folders became packages: the source tree.
        return Path(__file__).resolve().parent.parent / package


CONFIG_DIR = package_folder("configs")


class Label(BaseModel):
    """One incident label: its index in model outputs, name, prompt text and dashboard colour."""

    id: int
    name: str
    description: str
    colour: str
    # The description in other languages (es/it/pt), for a multilingual zero-shot prompt.
    translations: dict[str, str] = {}


@lru_cache(maxsize=1)
def labels() -> tuple[Label, ...]:
    """All labels, ordered by id (the order of every model's output vector)."""
    raw = json.loads((CONFIG_DIR / "labels.json").read_text(encoding="utf-8"))
    items = sorted((Label(**d) for d in raw["labels"]), key=lambda lab: lab.id)
    if [lab.id for lab in items] != list(range(len(items))):
        raise ValueError("configs/labels.json: label ids must be 0..n-1")
    return tuple(items)


def label_names() -> list[str]:
    """Label names in model-output order."""
    return [lab.name for lab in labels()]


def label_index(name: str) -> int:
    """Index of a label name; raises KeyError for an unknown label."""
    for lab in labels():
        if lab.name == name:
            return lab.id
    raise KeyError(name)
