"""Every served fine-tuned encoder carries a recipe that its fine-tuner accepts, so
``cityfuse train --encoders`` can rebuild it (the runs themselves are scripts, not tests)."""

from __future__ import annotations

import dataclasses

import pytest

from models import finetune_speech, finetune_text, finetune_vision
from models.fusion import ARTIFACT_DIR
from models.reproduce import MODALITIES, recipe, selected_artifact

CONFIGS = {
    "text": finetune_text.FTConfig,
    "image": finetune_vision.FinetuneConfig,
    "audio": finetune_speech.FinetuneConfig,
}


@pytest.mark.parametrize("modality", MODALITIES)
def test_selected_artifact_has_a_recipe_its_finetuner_accepts(modality: str) -> None:
    name = selected_artifact(modality)
    assert name is not None, f"{modality} serves frozen weights (configs/models.json)"
    method, config = recipe(ARTIFACT_DIR / name)
    fields = {f.name for f in dataclasses.fields(CONFIGS[modality])}
    assert set(config) - {"method"} <= fields
    finetuner = {"text": finetune_text, "image": finetune_vision, "audio": finetune_speech}
    assert method in finetuner[modality].METHODS


def test_vision_recipe_is_fully_replayed() -> None:
    """``refinetune`` passes only epochs, lr, threads and the frame input (view, size) to the
    vision run: the rest of the stored recipe must be the run's defaults, or the rebuild
    would differ."""
    name = selected_artifact("image")
    assert name is not None
    method, config = recipe(ARTIFACT_DIR / name)
    # A refit on train + val (models.vision_cv.refit) records only that in ``extra``.
    extra = {"fit_on": "train+val"} if config["extra"] else {}
    assert config["extra"] == extra
    rebuilt = finetune_vision.FinetuneConfig(
        method=method,
        epochs=config["epochs"],
        lr=config["lr"],
        threads=config["threads"],
        view=config["view"],
        size=config["size"],
        extra=extra,
    )
    assert dataclasses.asdict(rebuilt) == config


@pytest.mark.parametrize("modality", MODALITIES)
def test_a_served_refit_has_its_train_only_twin_with_the_same_recipe(modality: str) -> None:
    """A refit (``-tv``) serves; ``--choices-only`` chooses on val with its train-only twin,
    which must exist and differ from it only in what the refit changes (rows, name)."""
    from models.train import train_only

    name = selected_artifact(modality)
    assert name is not None
    twin = train_only(name)
    assert train_only(twin) == twin
    _, refit = recipe(ARTIFACT_DIR / name)
    if twin == name:  # a train-only artifact serves: its recipe must say so
        assert refit.get("fit_on", "train") == "train" and not refit.get("extra")
        return
    _, base = recipe(ARTIFACT_DIR / twin)
    if modality == "image":
        assert refit.pop("extra") == {"fit_on": "train+val"} and base.pop("extra") == {}
    else:
        assert (refit.pop("fit_on"), base.pop("fit_on", "train")) == ("train+val", "train")
    if modality == "text":
        assert refit.pop("tag") == base.pop("tag") + "-tv"
    # Threads are the cores a run had (each replays with its own), not part of the recipe.
    refit.pop("threads", None), base.pop("threads", None)
    assert refit == base
