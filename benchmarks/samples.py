"""Fixed samples of real development data, turned into input-topic messages for the benchmarks.

Samples come from the validation split (``models.splits.three_way``) for text and frames,
and for calls from every voice outside the test split (the word error rate is reported
per voice, so every non-test voice is wanted). The choice is a seeded, deterministic
function of the data, so every run measures the same events.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from kafka.consumer.fetcher import ConsumerRecord

from models.datasets import audio_table, image_table, text_table
from models.splits import three_way
from streams import topics
from streams.schemas import utc_now

SEED = 13
# "5-second calls" (the issue): the clips of the data set closest to 5 s.
CALL_SECONDS = (4.0, 5.5)


@dataclass(frozen=True)
class Sample:
    """One real input, ready to be put on its topic."""

    topic: str
    label: str
    group: str
    payload: dict[str, Any]  # the message fields without event_id/ts (media inline)
    transcript: str | None = None
    seconds: float | None = None

    def message(self, event_id: str, incident_id: str | None = None) -> dict[str, Any]:
        """The message as it goes on the topic."""
        msg = {"event_id": event_id, "ts": utc_now(), "source": "bench", **self.payload}
        if incident_id is not None:
            msg["incident_id"] = incident_id
        return msg

    def value(self, event_id: str, incident_id: str | None = None) -> bytes:
        """The record value (UTF-8 JSON)."""
        return json.dumps(self.message(event_id, incident_id)).encode()


def _pick(df: pl.DataFrame, n: int) -> pl.DataFrame:
    """``n`` rows (or all), seeded, in a stable order."""
    return df.sort("key").sample(min(n, df.height), seed=SEED, shuffle=True)


def _media(path: str, content_type: str) -> dict[str, str]:
    return {
        "content_type": content_type,
        "data_b64": base64.b64encode(Path(path).read_bytes()).decode(),
    }


def text_samples(n: int) -> list[Sample]:
    """``n`` validation reports."""
    df = text_table()
    df = _pick(df.filter(three_way(df, "text") == "val"), n)
    return [
        Sample(topics.TEXT, r["label"], r["group"], {"text": r["text"], "lang": r["lang"]})
        for r in df.iter_rows(named=True)
    ]


def image_samples(n: int) -> list[Sample]:
    """``n`` validation frames (JPEG or PNG as stored)."""
    df = image_table()
    df = _pick(df.filter(three_way(df, "image") == "val"), n)
    out = []
    for r in df.iter_rows(named=True):
        kind = "image/png" if r["path"].lower().endswith(".png") else "image/jpeg"
        payload = {"camera_id": r["camera_id"] or r["group"], "media": _media(r["path"], kind)}
        out.append(Sample(topics.FRAMES, r["label"], r["group"], payload))
    return out


def call_samples(n: int) -> list[Sample]:
    """Up to ``n`` calls of about 5 s, spread over every non-test voice (round robin)."""
    df = audio_table()
    lo, hi = CALL_SECONDS
    df = df.filter(
        (three_way(df, "audio") != "test") & pl.col("duration_s").is_between(lo, hi)
    ).sort("key")
    by_voice = {
        v: _pick(df.filter(pl.col("group") == v), n).to_dicts()
        for v in sorted(df["group"].unique())
    }
    rows: list[dict[str, Any]] = []
    while len(rows) < n and any(by_voice.values()):
        for v in sorted(by_voice):
            if by_voice[v] and len(rows) < n:
                rows.append(by_voice[v].pop(0))
    return [
        Sample(
            topics.CALLS,
            r["label"],
            r["group"],
            {"call_id": r["key"], "media": _media(r["path"], "audio/ogg")},
            transcript=r["transcript"],
            seconds=float(r["duration_s"]),
        )
        for r in rows
    ]


def records(samples: list[Sample], prefix: str) -> list[ConsumerRecord]:
    """The samples as consumer records, as a service's poll would hand them over."""
    out = []
    now_ms = int(time.time() * 1000)
    for i, s in enumerate(samples):
        value = s.value(f"{prefix}-{i}")
        out.append(
            ConsumerRecord(s.topic, 0, -1, i, now_ms, 0, None, value, [], None, -1, len(value), -1)
        )
    return out
