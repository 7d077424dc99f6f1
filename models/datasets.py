"""The development data in ``../shared/data`` as polars tables with a uniform shape.

Every table has ``key`` (unique id), ``label``, ``group`` (the split unit) and the
modality's payload column (``text`` or ``path``).
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from streams.taxonomy import label_names


def data_dir() -> Path:
    """``$CITYFUSE_DATA_DIR`` or ``../shared/data`` next to the repository."""
    env = os.environ.get("CITYFUSE_DATA_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        raise FileNotFoundError(f"data folder not found: {path} (set CITYFUSE_DATA_DIR)")
    return path


def _check_labels(df: pl.DataFrame, name: str) -> pl.DataFrame:
    unknown = set(df["label"].unique()) - set(label_names())
    if unknown:
        raise ValueError(f"{name}: labels not in configs/labels.json: {sorted(unknown)}")
    return df


def text_table(root: Path | None = None) -> pl.DataFrame:
    """City reports: key, text, label, group, lang."""
    root = root or data_dir()
    df = pl.read_csv(root / "text" / "city_reports.csv")
    return _check_labels(
        df.select(pl.col("id").alias("key"), "text", "label", "group", "lang"), "text"
    )


def image_table(root: Path | None = None) -> pl.DataFrame:
    """Camera frames and photos: key, path (absolute), label, group, camera_id, source, license."""
    root = root or data_dir()
    folder = root / "images"
    df = pl.read_csv(folder / "images.csv", infer_schema_length=0)
    df = df.with_columns(
        pl.col("path").alias("key"),
        (pl.lit(str(folder) + "/") + pl.col("path")).alias("path"),
    )
    return _check_labels(
        df.select("key", "path", "label", "group", "camera_id", "source", "license", "frame_index"),
        "images",
    )


def audio_table(root: Path | None = None) -> pl.DataFrame:
    """Hotline clips: key, path (absolute), label, group (voice), sentence_id, transcript."""
    root = root or data_dir()
    folder = root / "audio"
    df = pl.read_csv(folder / "audio.csv")
    df = df.with_columns(
        pl.col("path").alias("key"),
        (pl.lit(str(folder) + "/") + pl.col("path")).alias("path"),
    )
    return _check_labels(
        df.select(
            "key", "path", "label", "group", "sentence_id", "transcript", "duration_s", "source"
        ),
        "audio",
    )
