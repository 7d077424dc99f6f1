"""Rebuild the served encoder artifacts from the recipe each one carries.

Every fine-tuned artifact stores its method and hyper-parameters in its safetensors metadata
(``method`` and ``config``), written by its modality's fine-tuner. ``cityfuse train --encoders``
reads the artifacts selected in ``configs/models.json`` and re-runs exactly those recipes, so
the shipped encoders are reproducible from the repository alone (then the fusion head is
retrained on what they produce).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.fusion import ARTIFACT_DIR
from streams.console import console
from streams.taxonomy import CONFIG_DIR

MODALITIES = ("text", "image", "audio")


def selected_artifact(modality: str) -> str | None:
    """The artifact file ``configs/models.json`` selects for ``modality`` (None = frozen)."""
    raw = json.loads((CONFIG_DIR / "models.json").read_text(encoding="utf-8"))
    name = dict(raw[modality]).get("artifact")
    return str(name) if name else None


def recipe(path: Path) -> tuple[str, dict[str, Any]]:
    """``(method, config)`` stored in an artifact's metadata by the run that wrote it."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "method" not in meta or "config" not in meta:
        raise ValueError(f"{path.name} has no recipe (method/config) in its metadata")
    return meta["method"], dict(json.loads(meta["config"]))


def text_variant(config: dict[str, Any], tag_suffix: str = "") -> tuple[int, str, dict[str, Any]]:
    """``(steps, tag, the other settings)`` of a text recipe's ``config`` (from :func:`recipe`),
    ready for ``finetune_text.run``: the tag without its refit suffix (``run`` names a fit by
    its ``fit_on``) and with ``tag_suffix`` (a variant of the recipe) appended."""
    from models.weights import REFIT_SUFFIX

    rest = {k: v for k, v in config.items() if k not in ("method", "steps", "tag")}
    tag = str(config.get("tag", "")).removesuffix(REFIT_SUFFIX) + tag_suffix
    return int(config["steps"]), tag, rest


def refinetune(
    modality: str, folder: Path = ARTIFACT_DIR, fit_on: str | None = None
) -> dict[str, Any] | None:
    """Re-run the recipe of ``modality``'s selected artifact; None when it serves frozen weights.

    The new weights overwrite the artifact of the same name (its recipe is unchanged).
    ``fit_on`` fits the same recipe on other rows instead (a cross-fit fold,
    ``models.crossfit``), under that fit's name in ``folder``."""
    name = selected_artifact(modality)
    if name is None:
        return None
    method, config = recipe(ARTIFACT_DIR / name)
    if fit_on is not None:
        config["fit_on"] = fit_on
    console.print(f"[bold]{modality}[/]: re-running {method} {config}")
    if modality == "text":
        from models import finetune_text

        steps, tag, settings = text_variant(config)
        return finetune_text.run(method, steps=steps, tag=tag, out_dir=folder, **settings)
    if modality == "image":
        from models import finetune_vision

        vision_fit = fit_on or config.get("extra", {}).get("fit_on", "train")
        # Recipes older than the frame-input fields read 224 px centre crops.
        view, size = str(config.get("view", "crop")), int(config.get("size", 224))
        if vision_fit != "train":
            from models.vision_cv import refit

            return refit(
                method,
                threads=int(config.get("threads", 1)),
                out_dir=folder,
                fit_on=vision_fit,
                view=view,
                size=size,
            )
        return finetune_vision.run(
            method,
            epochs=int(config["epochs"]),
            lr=float(config["lr"]),
            out_dir=folder,
            threads=int(config.get("threads", 1)),
            view=view,
            size=size,
        )
    from models import finetune_speech

    cfg = finetune_speech.FinetuneConfig(**config)
    return finetune_speech.run(method, out_dir=folder, cfg=cfg, fresh_teacher=True)
