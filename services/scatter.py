"""Scattered-incident recordings: reports of each scene from within ``jitter_m`` and ``span_s``.

Written to test correlation where a fixed grid fails: every scene sits on a corner of the old
500 m grid and its reports straddle a 600 s window boundary; scenes are at least
``spacing_m`` apart; no report carries an ``incident_id`` (truth has it). Real texts, frames and
hotline calls of the validation split (configs/splits.json) fill the scenes.
"""

from __future__ import annotations

import base64
import math
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl

from models.datasets import audio_table, image_table, text_table
from models.splits import three_way
from streams import topics
from streams.recording import Manifest, RecordingWriter
from streams.taxonomy import label_names

BASE = datetime(2026, 11, 30, 9, 0, 0, tzinfo=UTC)
CENTRE = (45.4642, 9.1900)
OLD_CELL_M = 500.0  # the fixed grid correlation used before (issue 11)
OLD_WINDOW_S = 600
_M_PER_DEG = 111_320.0


@dataclass
class ScatterPlan:
    """Shape of a scattered recording."""

    incidents: int = 100
    events: tuple[int, int] = (3, 6)  # reports per scene, inclusive range
    jitter_m: float = 150.0
    span_s: float = 240.0
    spacing_m: float = 1500.0
    calls: float = 0.0  # share of reports that are hotline calls
    frames: float = 0.35  # share that are camera frames (the rest are texts)
    bad: float = 0.0  # share of inputs that are broken (they must end in city.dlq)
    stagger_s: float = 20.0  # event time between consecutive scenes' starts
    seed: int = 11
    prefix: str = ""  # event ids start with it (default "sc<seed>"): unique per run if needed


def _pools(seed: int) -> dict[str, dict[str, list[str]]]:
    """Per modality, per label: texts or media paths of the validation split."""
    text = text_table()
    images = image_table()
    audio = audio_table()
    pools: dict[str, dict[str, list[str]]] = {"text": {}, "image": {}, "audio": {}}
    for name, df, col in (
        ("text", text.filter(three_way(text, "text") == "val"), "text"),
        ("image", images.filter(three_way(images, "image") == "val"), "path"),
        ("audio", audio.filter(three_way(audio, "audio") == "val"), "path"),
    ):
        for (label,), part in df.group_by("label"):
            values = part.sort("key")[col].to_list()
            random.Random(f"{seed}:{name}:{label}").shuffle(values)
            pools[name][str(label)] = values
    return pools


def _corner(i: int, n: int, spacing_m: float) -> tuple[float, float]:
    """Scene ``i`` of ``n`` on a square lattice, snapped to an old 500 m grid corner."""
    side = math.ceil(math.sqrt(n))
    step_cells = math.ceil(spacing_m / OLD_CELL_M)
    row0 = math.floor(CENTRE[0] / (OLD_CELL_M / _M_PER_DEG))
    row = row0 + (i // side - side // 2) * step_cells
    lat = row * OLD_CELL_M / _M_PER_DEG
    centre_lat = (row + 0.5) * OLD_CELL_M / _M_PER_DEG  # the old grid's column step of this row
    step_lon = OLD_CELL_M / _M_PER_DEG / math.cos(math.radians(centre_lat))
    col = math.floor(CENTRE[1] / step_lon) + (i % side - side // 2) * step_cells
    return lat, col * step_lon


def write_scattered(folder: Path, plan: ScatterPlan | None = None) -> Path:
    """Write the recording into ``folder`` and return it."""
    plan = plan or ScatterPlan()
    rng = random.Random(plan.seed)
    pools = _pools(plan.seed)
    labels = [lab for lab in label_names() if all(pools[m].get(lab) for m in pools)]
    used = {m: dict.fromkeys(pools[m], 0) for m in pools}

    def take(modality: str, label: str) -> str:
        values = pools[modality][label]
        used[modality][label] += 1
        return values[used[modality][label] % len(values)]

    writer = RecordingWriter(
        folder,
        Manifest(
            name=folder.name,
            description="scattered incidents: reports within ~150 m and 4 min of each scene",
            labels=label_names(),
            tasks=["correlation"],
        ),
    )
    rows: list[tuple[float, str, dict[str, object], dict[str, object]]] = []
    for i in range(plan.incidents):
        label = labels[i % len(labels)]
        lat, lon = _corner(i, plan.incidents, plan.spacing_m)
        # The scene starts up to span_s before an old window boundary, so it straddles it.
        boundary = OLD_WINDOW_S * (1 + math.floor(i * plan.stagger_s / OLD_WINDOW_S))
        start = boundary - rng.uniform(0.1, 0.9) * plan.span_s
        for j in range(rng.randint(*plan.events)):
            ts = start + rng.uniform(0, plan.span_s)
            r = plan.jitter_m * math.sqrt(rng.random())
            a = rng.uniform(0, 2 * math.pi)
            dlat = r * math.cos(a) / _M_PER_DEG
            dlon = r * math.sin(a) / (_M_PER_DEG * math.cos(math.radians(lat)))
            msg: dict[str, object] = {
                "schema_version": 1,
                "event_id": f"{plan.prefix or f'sc{plan.seed}'}-{i:04d}-{j}",
                "ts": (BASE + timedelta(seconds=ts)).isoformat().replace("+00:00", "Z"),
                "source": "scatter",
                "location": {"lat": round(lat + dlat, 7), "lon": round(lon + dlon, 7)},
            }
            kind = rng.random()
            if rng.random() < plan.bad:
                topic = topics.FRAMES
                msg |= {"camera_id": f"cam-{i}", "media": _junk()}
            elif kind < plan.calls:
                topic = topics.CALLS
                msg |= {"call_id": f"call-{i}-{j}", "media": _media(take("audio", label))}
            elif kind < plan.calls + plan.frames:
                topic = topics.FRAMES
                msg |= {"camera_id": f"cam-{i}-{j}", "media": _media(take("image", label))}
            else:
                topic = topics.TEXT
                msg |= {"text": take("text", label)}
            rows.append((ts, topic, msg, {"label": label, "incident_id": f"scene-{i:04d}"}))
    rows.sort(key=lambda r: (r[0], str(r[2]["event_id"])))
    t0 = rows[0][0] if rows else 0.0
    for ts, topic, msg, truth in rows:
        writer.add(round(ts - t0, 3), topic, msg, truth)
    writer.close()
    return folder


def _media(path: str) -> dict[str, str]:
    ext = Path(path).suffix.lower()
    ctype = {
        ".jpg": "image/jpeg",
        ".jpeg": "image/jpeg",
        ".png": "image/png",
        ".ogg": "audio/ogg",
        ".wav": "audio/wav",
        ".flac": "audio/flac",
        ".mp3": "audio/mpeg",
    }[ext]
    return {"content_type": ctype, "data_b64": base64.b64encode(Path(path).read_bytes()).decode()}


def _junk() -> dict[str, str]:
    """A frame that is not an image (it must be dead-lettered)."""
    return {"content_type": "image/jpeg", "data_b64": base64.b64encode(b"\xff\xd8junk").decode()}


def old_keys(lat: float, lon: float, ts: float) -> tuple[int, int, int]:
    """The fixed-grid key the old correlation gave a report (for showing what it split)."""
    step_lat = OLD_CELL_M / _M_PER_DEG
    row = math.floor(lat / step_lat)
    step_lon = step_lat / math.cos(math.radians((row + 0.5) * step_lat))
    return row, math.floor(lon / step_lon), int(ts // OLD_WINDOW_S)


def frame(folder: Path) -> pl.DataFrame:
    """The recording's events as a table (event_id, ts, lat, lon, truth incident)."""
    from streams.recording import read_recording

    _, events = read_recording(folder)
    return pl.DataFrame(
        [
            {
                "event_id": e.message["event_id"],
                "ts": datetime.fromisoformat(e.message["ts"].replace("Z", "+00:00")).timestamp(),
                "lat": e.message["location"]["lat"],
                "lon": e.message["location"]["lon"],
                "incident": (e.truth or {}).get("incident_id"),
                "topic": e.topic,
            }
            for e in events
        ]
    )
