"""Build ``recordings/demo`` from the TEST groups of ../shared/data (``models.splits.three_way``).

Every sample comes from a test group: never trained on, never used for a choice. Samples
are picked at random with a fixed seed (never by how the model does on them), and texts
are not filtered (no length or retweet filter): the demo shows the data as it is. The
text test events hold no fire report, so fire incidents carry frames and calls only. Usage:

    python scripts/build_demo_recording.py [--out recordings/demo] [--seed 7]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl

from models.datasets import audio_table, image_table, text_table
from models.splits import three_way
from streams import topics
from streams.correlation import ROUTE_M, geo_cell
from streams.recording import Manifest, RecordedEvent
from streams.schemas import Location
from streams.taxonomy import label_names

BASE_TS = datetime(2026, 11, 29, 8, 0, 0, tzinfo=UTC)
CENTRE = (45.4642, 9.1900)  # a city centre; incidents are spread around it

# Three incidents per label, each with its own mix of modalities:
# (text reports, frames, calls, has incident_id). Single-modality incidents included.
SHAPES = [(1, 2, 1, True), (0, 2, 0, False), (1, 0, 1, False)]
ROTATE = [(1, 1, 1, True), (1, 0, 0, False), (0, 1, 1, True)]
LABEL_ORDER = label_names()  # configs/labels.json
# (label, text reports, frames, calls, has incident_id)
PLAN = [
    (label, *shape)
    for k, label in enumerate(LABEL_ORDER)
    for shape in (SHAPES if k % 2 == 0 else ROTATE)
]


def cell_centre(lat: float, lon: float) -> tuple[float, float]:
    """Centre of the correlation cell holding (lat, lon), so small jitter stays in the cell."""
    row, col = geo_cell(Location(lat=lat, lon=lon))
    step_lat = ROUTE_M / 111_320.0
    c_lat = (row + 0.5) * step_lat
    step_lon = step_lat / math.cos(math.radians(c_lat))
    return c_lat, (col + 0.5) * step_lon


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("recordings/demo"))
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    texts = text_table()
    texts = texts.filter(three_way(texts, "text") == "test")
    images = image_table()
    images = images.filter(three_way(images, "image") == "test")
    audio = audio_table()
    audio = audio.filter(three_way(audio, "audio") == "test")

    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    (out / "media").mkdir(parents=True)
    events: list[RecordedEvent] = []
    provenance: list[dict[str, str]] = []
    used: set[str] = set()

    def pick(
        df: pl.DataFrame, label: str, n: int, same_camera: bool = False
    ) -> list[dict[str, str]]:
        rows = [
            r
            for r in df.filter(pl.col("label") == label).iter_rows(named=True)
            if r["key"] not in used
        ]
        if same_camera and n > 1:
            cams: dict[str, list[dict[str, str]]] = {}
            for r in rows:
                if r.get("camera_id"):
                    cams.setdefault(r["camera_id"], []).append(r)
            multi = sorted(c for c, v in cams.items() if len(v) >= n)
            if multi:
                cam = rng.choice(multi)
                chosen = sorted(cams[cam], key=lambda r: int(r["frame_index"] or 0))
                start = rng.randrange(0, len(chosen) - n + 1)
                rows_out = chosen[start : start + n]
                used.update(r["key"] for r in rows_out)
                return rows_out
        chosen_rows = rng.sample(rows, min(n, len(rows)))  # text test has no fire report
        used.update(r["key"] for r in chosen_rows)
        return chosen_rows

    for i, (label, n_text, n_img, n_call, with_id) in enumerate(PLAN):
        if n_text and texts.filter(pl.col("label") == label).is_empty():
            n_img += n_text  # no test report of this label (fire): a frame instead
        angle = 2 * math.pi * i / len(PLAN)
        radius = 0.02 + 0.01 * (i % 3)  # degrees: incidents km apart
        lat, lon = cell_centre(
            CENTRE[0] + radius * math.sin(angle), CENTRE[1] + radius * math.cos(angle)
        )
        incident_id = f"demo-{i:02d}" if with_id else None
        t = 6.0 * i
        truth = {"label": label, "incident_id": incident_id or f"geo-demo-{i:02d}"}
        items: list[tuple[str, dict[str, object]]] = []
        for r in pick(texts, label, n_text):
            items.append(
                (topics.TEXT, {"text": r["text"], "lang": r["lang"], "source": "citizen_app"})
            )
            provenance.append(
                {
                    "event": f"text of incident {i}",
                    "id": r["key"],
                    "group": r["group"],
                    "from": "shared/data/text/city_reports.csv",
                }
            )
        for r in pick(images, label, n_img, same_camera=True):
            src = Path(r["path"])
            name = f"media/inc{i:02d}_{src.name}"
            shutil.copy(src, out / name)
            cam = r["camera_id"] or f"cam-{i:02d}"
            items.append(
                (
                    topics.FRAMES,
                    {
                        "camera_id": cam,
                        "frame_index": int(r["frame_index"]) if r["frame_index"] else 0,
                        "media": {"content_type": "image/jpeg", "path": name},
                        "source": "cctv",
                    },
                )
            )
            provenance.append(
                {
                    "file": name,
                    "from": f"shared/data/images/{r['key']}",
                    "group": r["group"],
                    "source": r["source"],
                    "license": r["license"],
                }
            )
        for r in pick(audio, label, n_call):
            src = Path(r["path"])
            name = f"media/inc{i:02d}_{src.name}"
            shutil.copy(src, out / name)
            items.append(
                (
                    topics.CALLS,
                    {
                        "call_id": f"call-{i:02d}-{src.stem}",
                        "duration_s": float(r["duration_s"]),
                        "media": {"content_type": "audio/ogg", "path": name},
                        "source": "hotline",
                    },
                )
            )
            provenance.append(
                {
                    "file": name,
                    "from": f"shared/data/audio/{r['key']}",
                    "group": r["group"],
                    "source": r["source"],
                    "license": "written for the project; synthetic TTS",
                }
            )
        rng.shuffle(items)
        for j, (topic, msg) in enumerate(items):
            te = t + 1.5 * j + rng.random()
            jitter = (rng.uniform(-1, 1) * 0.0008, rng.uniform(-1, 1) * 0.0008)
            message: dict[str, object] = {
                "schema_version": 1,
                "event_id": f"demo-{i:02d}-{j}",
                "ts": (BASE_TS + timedelta(seconds=te)).isoformat().replace("+00:00", "Z"),
                "location": {"lat": round(lat + jitter[0], 6), "lon": round(lon + jitter[1], 6)},
                "area": f"district-{i % 5 + 1}",
                **msg,
            }
            if incident_id:
                message["incident_id"] = incident_id
            events.append(RecordedEvent(t=round(te, 2), topic=topic, message=message, truth=truth))

    # Bad input the pipeline must survive: each should land in city.dlq.
    corrupt = out / "media" / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + bytes(rng.randrange(256) for _ in range(2000)))
    noise = out / "media" / "noise.ogg"
    noise.write_bytes(bytes(rng.randrange(256) for _ in range(4000)))
    end = 6.0 * len(PLAN)
    bad = [
        (
            topics.FRAMES,
            {
                "camera_id": "cam-broken",
                "media": {"content_type": "image/jpeg", "path": "media/corrupt.jpg"},
            },
        ),
        (
            topics.CALLS,
            {
                "call_id": "call-noise",
                "media": {"content_type": "audio/ogg", "path": "media/noise.ogg"},
            },
        ),
        (topics.TEXT, {"lang": "en"}),  # no text: fails validation
    ]
    for k, (topic, msg) in enumerate(bad):
        message = {
            "schema_version": 1,
            "event_id": f"demo-bad-{k}",
            "ts": (BASE_TS + timedelta(seconds=end + k)).isoformat().replace("+00:00", "Z"),
            "source": "fault-injection",
            **msg,
        }
        events.append(RecordedEvent(t=end + k, topic=topic, message=message, truth=None))

    events.sort(key=lambda e: e.t)
    manifest = Manifest(
        name="demo",
        description=(
            f"{len(PLAN)} incidents over all seven labels, built from the TEST groups of "
            "../shared/data (models.splits.three_way: never trained on, never used for a "
            "choice; texts unfiltered), plus 3 bad inputs for the DLQ."
        ),
        labels=label_names(),
        tasks=["label"],
        provenance=[
            {
                "built_by": "scripts/build_demo_recording.py",
                "seed": str(args.seed),
                "data": "../shared/data",
                "split": "test (models.splits.three_way, configs/splits.json)",
            },
            *provenance,
        ],
    )
    (out / "manifest.json").write_text(manifest.model_dump_json(indent=2))
    with (out / "events.jsonl").open("w") as f:
        for e in events:
            f.write(json.dumps(e.model_dump(exclude_none=True), ensure_ascii=False) + "\n")
    counts = {tp: sum(e.topic == tp for e in events) for tp in topics.INPUT_TOPICS}
    print(f"wrote {out}: {len(events)} events {counts}, {len(PLAN)} incidents")


if __name__ == "__main__":
    main()
