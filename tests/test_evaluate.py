"""``evaluate`` offline and through Kafka, on a recording written here (never seen by training
choices), and the CLI's handling of bad arguments."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.datasets import audio_table, image_table
from models.splits import audio_split, grouped_split
from services.evaluate import evaluate
from services.runtime import Models
from streams import topics
from streams.recording import Manifest, RecordingWriter, read_recording
from streams.taxonomy import label_names


def _b64(path: str) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three incidents from held-out groups, one per correlation mode, plus one corrupt frame."""
    folder = tmp_path_factory.mktemp("rec") / "small"
    images = image_table()
    images = images.filter(grouped_split(images))
    audio = audio_table()
    audio = audio.filter(audio_split(audio)[1])
    fire_img = images.filter(images["label"] == "fire")["path"][0]
    flood_img = images.filter(images["label"] == "flood")["path"][0]
    flood_call = audio.filter(audio["label"] == "flood")["path"][0]
    w = RecordingWriter(folder, Manifest(name="small", labels=label_names()))
    base = {"schema_version": 1, "source": "test"}
    w.add(
        0.0,
        topics.TEXT,
        {
            **base,
            "event_id": "a1",
            "ts": "2026-11-29T09:00:00Z",
            "incident_id": "A",
            "text": "Fire in the apartment block, flames and smoke from the roof",
        },
        {"label": "fire"},
    )
    w.add(
        0.5,
        topics.FRAMES,
        {
            **base,
            "event_id": "a2",
            "ts": "2026-11-29T09:00:01Z",
            "incident_id": "A",
            "camera_id": "c1",
            "media": {"content_type": "image/jpeg", "data_b64": _b64(fire_img)},
        },
        {"label": "fire"},
    )
    loc = {"lat": 40.4168, "lon": -3.7038}
    w.add(
        1.0,
        topics.FRAMES,
        {
            **base,
            "event_id": "b1",
            "ts": "2026-11-29T09:00:02Z",
            "location": loc,
            "camera_id": "c2",
            "media": {"content_type": "image/jpeg", "data_b64": _b64(flood_img)},
        },
        {"label": "flood"},
    )
    w.add(
        1.5,
        topics.CALLS,
        {
            **base,
            "event_id": "b2",
            "ts": "2026-11-29T09:00:03Z",
            "location": loc,
            "call_id": "k1",
            "media": {"content_type": "audio/ogg", "data_b64": _b64(flood_call)},
        },
        {"label": "flood"},
    )
    w.add(
        2.0,
        topics.TEXT,
        {
            **base,
            "event_id": "c1",
            "ts": "2026-11-29T09:00:04Z",
            "location": {"lat": 41.0, "lon": 2.0},
            "text": "Multi-vehicle crash on the ring road, cars collided, ambulance on scene",
        },
        {"label": "traffic_accident"},
    )
    w.add(
        2.5,
        topics.FRAMES,
        {
            **base,
            "event_id": "bad",
            "ts": "2026-11-29T09:00:05Z",
            "camera_id": "c3",
            "media": {
                "content_type": "image/jpeg",
                "data_b64": base64.b64encode(b"\xff\xd8junk").decode(),
            },
        },
    )
    w.close()
    return folder


def _check(result: dict, n_events: int) -> None:
    assert result["events"] == n_events
    for m in ("text", "image", "audio"):
        assert set(result["per_modality"][m]) == {"n", "accuracy", "macro_f1"}
    assert result["per_modality"]["image"]["n"] == 2
    assert result["incidents"]["n"] == 3
    assert result["incidents"]["accuracy"] >= 2 / 3
    assert set(result["per_class"]) == set(label_names())
    assert result["dlq"] == {"count": 1, "by_reason": {"image_decode_error": 1}}
    assert Path(result["confusion_png"]).read_bytes()[:4] == b"\x89PNG"


def test_recording_round_trip(recording: Path) -> None:
    manifest, events = read_recording(recording)
    assert manifest.name == "small" and len(events) == 6
    assert (recording / events[1].message["media"]["path"]).is_file()


def test_evaluate_offline(recording: Path, models: Models, tmp_path: Path) -> None:
    result = evaluate(recording, tmp_path / "m.json", models=models)
    _check(result, 6)
    assert json.loads((tmp_path / "m.json").read_text())["incidents"] == result["incidents"]


def test_evaluate_via_kafka(recording: Path, models: Models, tmp_path: Path) -> None:
    result = evaluate(recording, tmp_path / "k.json", via_kafka=True, models=models)
    _check(result, 6)
    assert set(result["latency_ms"]) == {"p50", "p95", "p99"}
    assert 0 < result["latency_ms"]["p50"] < 60_000
    assert result["alerts_per_incident"] >= 1
    assert result["timed_out"] is False


@pytest.mark.parametrize(
    "args",
    [
        ["evaluate", "/nonexistent/recording"],
        ["replay", "/nonexistent/recording"],
        ["demo", "--recording", "/nonexistent/recording"],
    ],
)
def test_cli_bad_input_is_one_line_and_nonzero(args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "not a folder" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2
