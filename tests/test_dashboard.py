"""The operator dashboard in a real browser (Debian chromium via Playwright) against the real
session broker: alerts and evidence are produced as records, feedback is read back."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.dashboard.browser import chromium_context
from services.dashboard.server import RunningDashboard, start_dashboard
from streams import topics
from streams.clients import KafkaSettings
from streams.schemas import (
    Alert,
    Embedding,
    EncoderRef,
    Feedback,
    Location,
    encode_vector,
    utc_now,
)
from streams.serde import to_bytes
from tests.kafka_helpers import reader, send, wait_for

MEDIA = Path(__file__).resolve().parent.parent / "recordings" / "demo" / "media"
TOKEN = "test-token-" + uuid.uuid4().hex
RUN = uuid.uuid4().hex[:8]
FRAME_ID, CALL_ID, TEXT_ID = f"f-{RUN}", f"c-{RUN}", f"t-{RUN}"
ALERT_ID = f"alert-{RUN}"
XSS = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
TRANSCRIPT = "there is a car crash on the main road, two cars"
WHERE = Location(lat=45.4652, lon=9.2128)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _demo_media(topic: str) -> Path:
    """A real frame or call of the demo recording (one its ground truth labels)."""
    from streams.recording import read_recording

    _, events = read_recording(MEDIA.parent)
    ev = next(e for e in events if e.topic == topic and e.truth and "media" in e.message)
    return MEDIA.parent / ev.message["media"]["path"]


def _alert(version: int, evidence: list[str], label: str = "traffic_accident") -> Alert:
    probs = {"traffic_accident": 0.7, "fire": 0.1, "no_incident": 0.2}
    return Alert(
        alert_id=ALERT_ID,
        version=version,
        incident_id=f"inc-{RUN}",
        correlation_key=f"key-{RUN}",
        label=label,
        confidence=0.7 if version == 1 else 0.82,
        probs=probs,
        modalities=["image", "audio"] if version == 1 else ["text", "image", "audio"],
        contributions={"image": 0.3, "audio": 0.25, "text": 0.1},
        evidence=evidence,
        location=WHERE,
        area="district-1",
        first_event_ts=utc_now(),
        emitted_ts=utc_now(),
        model_version="test-head",
    )


def _produce_evidence(settings: KafkaSettings) -> None:
    ts = utc_now()
    loc = WHERE.model_dump()
    media = (
        (topics.FRAMES, FRAME_ID, "camera_id", "cam-1", "cctv", "image/jpeg"),
        (topics.CALLS, CALL_ID, "call_id", "call-1", "hotline", "audio/ogg"),
    )
    for topic, event_id, name_field, name, source, ctype in media:
        data = _b64(_demo_media(topic))
        send(
            settings,
            topic,
            {
                "event_id": event_id,
                "ts": ts,
                name_field: name,
                "location": loc,
                "source": source,
                "media": {"content_type": ctype, "data_b64": data},
            },
            key=name,
        )
    send(
        settings,
        topics.TEXT,
        {"event_id": TEXT_ID, "ts": ts, "text": XSS, "location": loc, "source": "app"},
    )
    emb = Embedding(
        event_id=CALL_ID,
        modality="audio",
        correlation_key=f"key-{RUN}",
        ts=ts,
        vector=encode_vector(np.zeros(4, dtype=np.float32)),
        dim=4,
        encoder=EncoderRef(name="whisper", version="test"),
        transcript=TRANSCRIPT,
        ingest_ts=ts,
    )
    send(settings, topics.EMBEDDINGS, to_bytes(emb), key=f"key-{RUN}")


@pytest.fixture(scope="module")
def dashboard(settings: KafkaSettings) -> Iterator[RunningDashboard]:
    running = start_dashboard(settings, token=TOKEN)
    assert running.reader.ready.wait(30)
    yield running
    running.close()


@pytest.fixture(scope="module")
def page(dashboard: RunningDashboard) -> Iterator[Any]:
    with chromium_context() as ctx:
        pg = ctx.new_page()
        pg.set_default_timeout(30_000)
        pg.goto(dashboard.login_url)
        pg.wait_for_selector("#conn.live")
        yield pg


def _request(
    url: str, data: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers=headers or {})
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_binds_loopback(dashboard: RunningDashboard) -> None:
    assert dashboard.url.startswith("http://127.0.0.1:")


def test_requests_without_the_token_are_refused(dashboard: RunningDashboard) -> None:
    fb = {
        "alert_id": ALERT_ID,
        "version": 1,
        "action": "confirm",
        "label": "fire",
        "operator": "eve",
    }
    assert _request(f"{dashboard.url}/api/feedback", fb)[0] == 401
    assert (
        _request(f"{dashboard.url}/api/feedback", fb, {"X-Token": "wrong-token-123456"})[0] == 401
    )
    for path in ("/api/events", "/api/alerts", f"/api/media/{FRAME_ID}", "/api/health"):
        assert _request(dashboard.url + path)[0] == 401, path
    # With the token, bad input is refused with a reason (and never reaches the topic).
    bad = {**fb, "label": "<b>nope</b>"}
    status, body = _request(f"{dashboard.url}/api/feedback", bad, {"X-Token": TOKEN})
    assert status == 422 and b"unknown label" in body
    status, _ = _request(f"{dashboard.url}/api/feedback", {**fb, "x": 1}, {"X-Token": TOKEN})
    assert status == 422
    # The page itself is served with a CSP that forbids inline scripts.
    with urllib.request.urlopen(dashboard.url + "/", timeout=10) as r:
        assert "script-src 'self'" in r.headers["Content-Security-Policy"]


def test_alert_appears_live_and_a_new_version_updates_its_row(
    settings: KafkaSettings, dashboard: RunningDashboard, page: Any
) -> None:
    _produce_evidence(settings)
    row = f'#alerts tr[data-alert-id="{ALERT_ID}"]'
    send(settings, topics.ALERTS, to_bytes(_alert(1, [FRAME_ID, CALL_ID])), key=ALERT_ID)
    page.wait_for_selector(f'{row}[data-version="1"]')
    assert page.locator(row).count() == 1
    send(
        settings,
        topics.ALERTS,
        to_bytes(_alert(2, [FRAME_ID, CALL_ID, TEXT_ID])),
        key=ALERT_ID,
    )
    page.wait_for_selector(f'{row}[data-version="2"]')
    assert page.locator(row).count() == 1
    assert page.locator(row).locator("td.version").inner_text() == "v2"
    # The newest alert is the first row.
    assert page.locator("#alerts tbody tr").first.get_attribute("data-alert-id") == ALERT_ID
    # Filters: a label that is not this alert's hides the row.
    page.select_option("#f-label", "fire")
    assert page.locator(row).count() == 0
    page.select_option("#f-label", "")
    assert page.locator(row).count() == 1


def test_map_shows_the_open_incident(page: Any) -> None:
    page.click("#nav-map")
    marker = page.locator(f'#map a.marker[data-alert-id="{ALERT_ID}"] circle')
    marker.wait_for()
    assert marker.get_attribute("fill") == "#e67e22"  # traffic_accident in configs/labels.json
    assert (page.locator("#map .scalebar text").text_content() or "").endswith("m")


def test_incident_page_shows_frame_audio_transcript_and_escaped_text(page: Any) -> None:
    page.click("#nav-list")
    page.click(f'#alerts tr[data-alert-id="{ALERT_ID}"] a')
    page.wait_for_selector(f'#inc-frames figure[data-event-id="{FRAME_ID}"] img')
    img = page.locator(f'#inc-frames figure[data-event-id="{FRAME_ID}"] img')
    page.wait_for_function(
        "(img) => img.complete && img.naturalWidth > 0", arg=img.element_handle()
    )
    call = page.locator(f'#inc-calls div[data-event-id="{CALL_ID}"]')
    assert call.locator("p.transcript").inner_text() == TRANSCRIPT
    audio = call.locator("audio")
    page.wait_for_function("(a) => a.readyState >= 1 && a.duration > 1", arg=audio.element_handle())
    report = page.locator(f'#inc-texts div[data-event-id="{TEXT_ID}"] p.report-text')
    assert report.inner_text() == XSS
    assert page.locator("#inc-texts script, #inc-texts img").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#inc-versions tbody tr").count() == 2
    assert page.locator('#inc-probs .bar-row[data-name="traffic_accident"]').count() == 1


def test_confirm_and_relabel_produce_feedback_records(settings: KafkaSettings, page: Any) -> None:
    consumer = reader(settings, topics.FEEDBACK)
    page.fill("#fb-operator", "ana")
    page.fill("#fb-note", "seen on camera <b>")
    page.click("#btn-confirm")
    page.wait_for_selector("#fb-status.ok")
    page.select_option("#fb-label", "fire")
    page.click("#btn-relabel")
    # Locator waits, not string predicates: the page's CSP forbids eval, even for tests.
    page.locator("#fb-status.ok", has_text="relabel").wait_for()
    got = wait_for(consumer, lambda v: v.get("alert_id") == ALERT_ID, timeout=30)
    deadline = time.monotonic() + 20
    while len(got) < 2 and time.monotonic() < deadline:
        got += wait_for(consumer, lambda v: v.get("alert_id") == ALERT_ID, timeout=5)
    consumer.close()
    records = [Feedback.model_validate(v) for v in got]
    by_action = {r.action: r for r in records}
    assert set(by_action) == {"confirm", "relabel"}
    assert by_action["confirm"].label == "traffic_accident"
    assert by_action["relabel"].label == "fire"
    for r in records:
        assert (r.operator, r.version, r.note) == ("ana", 2, "seen on camera <b>")
    # The dashboard reads its own feedback back and shows the verdict on the row.
    page.click("#nav-list")
    page.locator(f'#alerts tr[data-alert-id="{ALERT_ID}"] td.verdict', has_text="fire").wait_for()


def test_health_shows_group_lag_and_dead_letters(
    settings: KafkaSettings, dashboard: RunningDashboard
) -> None:
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata

    from streams.clients import make_consumer
    from streams.schemas import DeadLetter

    reason = f"test_reason_{RUN}"
    dl = DeadLetter(
        stage="validate", reason=reason, topic=topics.TEXT, payload_b64="", ts=utc_now()
    )
    send(settings, topics.DLQ, to_bytes(dl))
    # A group that committed offset 0 on every alerts partition: its lag is the whole topic.
    group = f"dash-lag-{RUN}"
    c = make_consumer(settings, group)
    tps = [TopicPartition(topics.ALERTS, p) for p in sorted(c.partitions_for_topic(topics.ALERTS))]
    c.assign(tps)
    c.commit({tp: OffsetAndMetadata(0, "", -1) for tp in tps})
    c.close()
    deadline = time.monotonic() + 30
    while True:
        status, body = _request(f"{dashboard.url}/api/health", headers={"X-Token": TOKEN})
        health = json.loads(body)
        hw = sum(
            n
            for (t, _), n in dict(dashboard.dashboard.state.highwater).items()
            if t == topics.ALERTS
        )
        lag = health["groups"].get(group, {}).get("lag")
        if (
            lag == hw and hw > 0 and reason in health["dlq"]["by_reason"]
        ) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status == 200
    assert health["groups"][group]["by_topic"] == {topics.ALERTS: hw}
    assert health["dlq"]["by_reason"][reason] == 1
    assert health["records"][topics.ALERTS] >= 2
