"""End to end through the real broker: inputs in, alerts and dead letters out."""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.runtime import Models, Pipeline
from streams import topics
from streams.clients import KafkaSettings
from tests.kafka_helpers import event, media, reader, send, wait_for


@pytest.fixture(scope="module")
def pipeline(settings: KafkaSettings, models: Models) -> Iterator[Pipeline]:
    with Pipeline(settings, models, fusion_kw={"pending_s": 2.0}) as p:
        yield p
    assert not p.errors, p.errors


def report(settings: KafkaSettings, text: str, **fields: object) -> dict:
    """Send one citizen text report; returns the message sent."""
    msg = event(text=text, **fields)
    send(settings, topics.TEXT, msg)
    return msg


def _final(alerts: list[dict]) -> dict:
    return max(alerts, key=lambda a: a["version"])


def test_text_frame_and_call_make_one_fire_alert(
    pipeline: Pipeline, settings: KafkaSettings, data_dir: Path
) -> None:
    inc = f"it-fire-{uuid.uuid4().hex[:6]}"
    alerts = reader(settings, topics.ALERTS)
    report(
        settings,
        "Huge fire on Via Roma, flames and thick black smoke coming out of the apartment block",
        incident_id=inc,
    )
    send(
        settings,
        topics.FRAMES,
        event(
            incident_id=inc,
            camera_id="cam-7",
            media=media(data_dir / "images/fire/cairfire_010.jpg", "image/jpeg"),
        ),
        key="cam-7",
    )
    send(
        settings,
        topics.CALLS,
        event(
            incident_id=inc,
            call_id="c1",
            media=media(data_dir / "audio/fire/fire_01_mbrola-us2.ogg", "audio/ogg"),
        ),
        key="c1",
    )
    got = wait_for(alerts, lambda a: a.get("incident_id") == inc and len(a["modalities"]) == 3)
    assert got, "no alert with all three modalities"
    final = _final(got)
    assert final["label"] == "fire"
    assert final["confidence"] > 0.5
    assert sorted(final["modalities"]) == ["audio", "image", "text"]
    assert len(final["evidence"]) == 3
    assert final["transcript"] and "smoke" in final["transcript"].lower()
    assert abs(sum(final["probs"].values()) - 1) < 1e-3
    # Versions grow as evidence arrives; the id never changes.
    every = wait_for(
        reader(settings, topics.ALERTS), lambda a: a.get("incident_id") == inc, timeout=10
    )
    assert len({a["alert_id"] for a in every}) == 1
    assert sorted(a["version"] for a in every) == list(range(1, len(every) + 1))


def test_single_modality_incident_gets_an_alert(
    pipeline: Pipeline, settings: KafkaSettings
) -> None:
    inc = f"it-crash-{uuid.uuid4().hex[:6]}"
    alerts = reader(settings, topics.ALERTS)
    report(
        settings,
        "Crash on I-95 northbound: two cars collided and overturned, right lanes blocked",
        incident_id=inc,
    )
    got = wait_for(alerts, lambda a: a.get("incident_id") == inc)
    assert got
    final = _final(got)
    assert final["modalities"] == ["text"]
    assert final["label"] == "traffic_accident"


def test_events_without_incident_id_correlate_by_place_and_time(
    pipeline: Pipeline, settings: KafkaSettings, data_dir: Path
) -> None:
    loc = {"lat": 41.9028, "lon": 12.4964 + (uuid.uuid4().int % 1000) * 0.01}
    alerts = reader(settings, topics.ALERTS)
    first = report(
        settings,
        "The river has flooded the street, water is knee deep and rising into the houses",
        location=loc,
    )
    send(
        settings,
        topics.FRAMES,
        event(
            location={"lat": loc["lat"] + 0.0005, "lon": loc["lon"]},
            camera_id="cam-r",
            media=media(data_dir / "images/flood/floodmarco_flood_3366.jpg", "image/jpeg"),
        ),
        key="cam-r",
    )
    got = wait_for(alerts, lambda a: first["event_id"] in a["evidence"] and len(a["evidence"]) == 2)
    assert got
    assert _final(got)["label"] == "flood"


@pytest.mark.parametrize(
    ("topic", "value", "reason"),
    [
        (topics.FRAMES, "corrupt_jpeg", "image_decode_error"),
        (topics.CALLS, "random_audio", "audio_decode_error"),
        (topics.TEXT, "invalid", "schema_invalid"),
        (topics.TEXT, "not_json", "json_invalid"),
        (topics.TEXT, "future_version", "unsupported_schema_version"),
    ],
)
def test_bad_input_goes_to_dlq_and_service_goes_on(
    pipeline: Pipeline, settings: KafkaSettings, topic: str, value: str, reason: str
) -> None:
    dlq = reader(settings, topics.DLQ)
    eid = f"bad-{uuid.uuid4().hex[:8]}"
    payloads: dict[str, dict | bytes] = {
        "corrupt_jpeg": event(
            event_id=eid,
            camera_id="x",
            media={
                "content_type": "image/jpeg",
                "data_b64": base64.b64encode(b"\xff\xd8\xff\xe0" + os.urandom(2000)).decode(),
            },
        ),
        "random_audio": event(
            event_id=eid,
            call_id="x",
            media={
                "content_type": "audio/ogg",
                "data_b64": base64.b64encode(os.urandom(3000)).decode(),
            },
        ),
        "invalid": event(event_id=eid, text=12345, location={"lat": 123, "lon": 0}),
        "not_json": b"\x00\x01 not json " + eid.encode(),
        "future_version": {**event(event_id=eid, text="fire"), "schema_version": 99},
    }
    send(settings, topic, payloads[value], key=eid)
    got = wait_for(dlq, lambda d: eid.encode() in base64.b64decode(d["payload_b64"]))
    assert got, f"nothing in city.dlq for {value}"
    assert got[0]["reason"] == reason
    assert got[0]["topic"] == topic
    assert got[0]["stage"] in ("decode", "validate")
    # The service is still alive: a good message after the bad one is processed.
    inc = f"after-{eid}"
    alerts = reader(settings, topics.ALERTS)
    report(settings, "Smoke and flames from a burning car in the parking garage", incident_id=inc)
    assert wait_for(alerts, lambda a: a.get("incident_id") == inc)
    assert not pipeline.errors
