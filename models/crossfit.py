"""Cross-fitted encoder vectors for training the fusion head (stacking without leakage).

The fusion head is a second-level model over the encoders' vectors. An encoder's vectors of
the rows it was fitted on are surer and cleaner than those of a new input, so a head trained
on them learns to trust that encoder more than it should in service. With the served
encoders refitted on train + val, every row the head trains on was seen by them.

Cross-fitting (as in stacked generalisation): the head's training pool is dealt into
``FOLDS`` folds of whole groups (``models.splits.crossfit_fold``); for each fold the served
recipe is fitted on the other folds, and that fold's rows are embedded by it. Every training
vector then comes from an encoder that never saw its group, as in service. Val and test rows
keep the vectors of the encoders that are scored (never a fold model).

The fold encoders are rebuildable data: ``<cache>/crossfit/``, fitted on first use by
:func:`ensure_folds` (the served recipes, read from the served artifacts' metadata).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from models.reproduce import refinetune, selected_artifact
from models.splits import crossfit_fit_on, crossfit_fold, fit_suffix
from models.weights import REFIT_SUFFIX, cache_dir
from streams.console import console

# Each fold encoder sees half the pool: 2 fits per modality and pool. Measured here: a text
# fold 518 s on 2 threads, frames ~4 min, calls ~3 min with their teacher targets.
FOLDS = 2
MODALITIES = ("text", "image", "audio")


def fold_dir() -> Path:
    """Where the fold encoders live (a cache: never committed, rebuilt when missing)."""
    folder = cache_dir() / "crossfit"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def fold_artifact(modality: str, fit_on: str) -> Path:
    """The fold encoder of ``modality`` fitted with ``fit_on``: the served artifact's name,
    its refit suffix replaced by the fold's (``text_lora-all16-s300-tv-cf0of2.safetensors``)."""
    served = selected_artifact(modality)
    if served is None:
        raise ValueError(f"{modality} serves frozen weights: there is nothing to cross-fit")
    stem = Path(served).stem.removesuffix(REFIT_SUFFIX)
    return fold_dir() / f"{stem}{fit_suffix(fit_on)}.safetensors"


def ensure_folds(
    pool: str, modalities: tuple[str, ...] = MODALITIES, folds: tuple[int, ...] | None = None
) -> dict[str, list[Path]]:
    """Fit (once) every fold encoder of ``pool`` (or only ``folds``) with the served recipes;
    their paths."""
    out: dict[str, list[Path]] = {}
    for modality in modalities:
        out[modality] = []
        for held in range(FOLDS) if folds is None else folds:
            fit_on = crossfit_fit_on(pool, held, FOLDS)
            path = fold_artifact(modality, fit_on)
            if not path.exists():
                console.print(f"[bold]cross-fit[/] {modality} {fit_on}: fitting -> {path.name}")
                refinetune(modality, fold_dir(), fit_on=fit_on)
                if not path.exists():
                    raise RuntimeError(f"the {modality} fit {fit_on} wrote no {path.name}")
            out[modality].append(path)
    return out


def _fold_encoder(modality: str, path: Path) -> Any:
    if modality == "text":
        from models.text import FINETUNED_E5, TextEncoder

        return TextEncoder(FINETUNED_E5, artifact=str(path))
    if modality == "image":
        from models.vision import VisionEncoder

        return VisionEncoder(str(path))
    from models.speech import SpeechEncoder, speech_config

    return SpeechEncoder(config=replace(speech_config(), artifact=str(path)))


def fold_ids(df: pl.DataFrame, full: pl.DataFrame, modality: str, pool: str) -> np.ndarray:
    """The cross-fit fold of each row of ``df`` (-1 outside ``pool``), dealt on the modality's
    whole table ``full`` so that any subset of it gets the same folds."""
    fold_of = dict(
        zip(
            full["key"].to_list(),
            crossfit_fold(full, modality, pool, FOLDS).to_list(),
            strict=True,
        )
    )
    return np.array([fold_of[k] for k in df["key"]])


def out_of_fold(
    modality: str, df: pl.DataFrame, pool: str, full: pl.DataFrame, text_enc: Any
) -> tuple[np.ndarray, dict[str, np.ndarray], list[Path]]:
    """``(mask, features, fold encoders)`` for the rows of ``df`` in ``pool``: each row's vectors from the
    fold encoder that did not see its group. ``full`` is the modality's whole table (folds are
    dealt on it, so a capped ``df`` gets the same folds); ``text_enc`` embeds call
    transcripts (the text encoder never trains on calls). Features follow ``load_pools``:
    text ``text``; image ``image``; audio ``audio`` and ``transcript``."""
    from models.embed_cache import audio_embeddings, image_embeddings, text_embeddings

    paths = ensure_folds(pool, (modality,))[modality]
    fold = fold_ids(df, full, modality, pool)
    feats: dict[str, np.ndarray] = {}
    for held, path in enumerate(paths):
        rows = np.flatnonzero(fold == held)
        part = df[rows]
        enc = _fold_encoder(modality, path)
        if modality == "text":
            got = {"text": text_embeddings(part, enc)["text"]}
        elif modality == "image":
            got = {"image": image_embeddings(part, enc)["image"]}
        else:
            emb = audio_embeddings(part, enc, text_enc)
            got = {"audio": emb["audio"], "transcript": emb["transcript_vec"]}
        for name, x in got.items():
            feats.setdefault(name, np.zeros((df.height, x.shape[1]), dtype=np.float32))[rows] = x
    return fold >= 0, feats, paths


def main() -> None:
    """``python -m models.crossfit --pool train+val [--modality text] [--fold 0]``: fit fold
    encoders ahead of ``cityfuse train --crossfit``. (Two text folds side by side on one
    thread each took 722 and 707 s, no faster than one after the other on 2 threads.)"""
    import argparse

    from models.splits import CROSSFIT_POOLS

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--pool", choices=CROSSFIT_POOLS, required=True)
    ap.add_argument("--modality", choices=MODALITIES, action="append")
    ap.add_argument("--fold", type=int, choices=range(FOLDS), action="append")
    args = ap.parse_args()
    folds = tuple(args.fold) if args.fold else None
    for modality in args.modality or MODALITIES:
        for path in ensure_folds(args.pool, (modality,), folds)[modality]:
            console.print(f"{modality}: {path.name}")


if __name__ == "__main__":
    main()
