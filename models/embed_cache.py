"""Embeddings of the development data, computed once with the frozen encoders and cached on disk.

The cache is data a script rebuilds (never committed): ``<cache>/embeddings/<modality>-<encoder version>.npz``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import polars as pl

from models.weights import cache_dir
from streams.console import progress

if TYPE_CHECKING:  # the encoders import torch & co.; only their types are needed here
    from models.speech import SpeechEncoder
    from models.text import TextEncoder
    from models.vision import VisionEncoder

T = TypeVar("T")


def _cache_file(modality: str, version: str) -> Path:
    folder = cache_dir() / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{modality}-{version}.npz"


def _batched(
    items: Sequence[T], fn: Callable[[list[T]], dict[str, np.ndarray]], batch: int, what: str
) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    with progress() as bar:
        task = bar.add_task(what, total=len(items))
        for i in range(0, len(items), batch):
            for k, v in fn(list(items[i : i + batch])).items():
                parts.setdefault(k, []).append(v)
            bar.advance(task, min(batch, len(items) - i))
    return {k: np.concatenate(v) for k, v in parts.items()}


def cached(
    modality: str, version: str, keys: list[str], compute: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Load arrays for ``keys`` from the cache, or compute and store them (rows follow ``keys``)."""
    path = _cache_file(modality, version)
    if path.exists():
        data = dict(np.load(path, allow_pickle=False))
        if list(data["keys"]) == keys:
            return data
    data = compute()
    data["keys"] = np.array(keys)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **data)  # type: ignore[arg-type]
    tmp.replace(path)
    return data


def text_embeddings(df: pl.DataFrame, encoder: TextEncoder) -> dict[str, np.ndarray]:
    """{"text": (n, 384)} for a text table, using a :class:`models.text.TextEncoder`."""
    texts = df["text"].to_list()
    return cached(
        "text",
        encoder.version,
        df["key"].to_list(),
        lambda: _batched(texts, lambda b: {"text": encoder.encode(b)}, 64, "embed texts"),
    )


def image_embeddings(df: pl.DataFrame, encoder: VisionEncoder) -> dict[str, np.ndarray]:
    """{"image": (n, 1280)} for an image table, using a :class:`models.vision.VisionEncoder`."""
    from models.images import decode_image

    paths = df["path"].to_list()

    def run(batch: list[str]) -> dict[str, np.ndarray]:
        return encoder.embed_batch([decode_image(Path(p).read_bytes()) for p in batch])

    data = cached(
        "image",
        encoder.version,
        df["key"].to_list(),
        lambda: _batched(paths, run, 32, "embed frames"),
    )
    # With the per-camera reference, frames are replayed per camera in frame order.
    return {"image": encoder.table_features(df, data)}


def audio_embeddings(
    df: pl.DataFrame, speech: SpeechEncoder, text: TextEncoder
) -> dict[str, np.ndarray]:
    """{"audio": (n, 384) Whisper, "transcript": (n,) str, "transcript_vec": (n, 384) MiniLM}.

    Only the slow Whisper part is cached; the transcripts are re-embedded with the current
    text encoder (seconds), so a text-side change never re-runs transcription.
    """
    from models.audio import decode_audio

    paths = df["path"].to_list()

    def run(batch: list[str]) -> dict[str, np.ndarray]:
        emb, transcripts = speech.encode([decode_audio(Path(p).read_bytes()) for p in batch])
        return {"audio": emb, "transcript": np.array(transcripts, dtype=str)}

    data = cached(
        "audio",
        speech.version,
        df["key"].to_list(),
        lambda: _batched(paths, run, 16, "embed + transcribe calls"),
    )
    data["transcript_vec"] = text.encode([str(t) for t in data["transcript"]])
    return data
