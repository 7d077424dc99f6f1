"""Fusion state survives a restart: nothing lost, no version emitted twice."""

from __future__ import annotations

import threading
import time
from collections import Counter

from models.fusion import FusionModel
from services.fusion import FusionService
from services.runtime import Models
from streams import topics
from streams.broker import EmbeddedBroker
from streams.clients import KafkaSettings, ensure_topics, make_producer
from streams.schemas import Embedding, EncoderRef, encode_vector, utc_now
from streams.serde import to_bytes
from tests.kafka_helpers import reader


def _embedding(models: Models, event_id: str, text: str) -> bytes:
    v = models.text.encode([text])[0]
    return to_bytes(
        Embedding(
            event_id=event_id,
            modality="text",
            correlation_key="inc:R1",
            ts=utc_now(),
            incident_id="R1",
            vector=encode_vector(v),
            dim=v.shape[0],
            encoder=EncoderRef(name="t", version="1"),
            ingest_ts=utc_now(),
        )
    )


def _run(settings: KafkaSettings, fusion: FusionModel) -> tuple[FusionService, threading.Thread]:
    svc = FusionService(settings, fusion, pending_s=0.5)
    t = threading.Thread(target=svc.run, daemon=True)
    t.start()
    return svc, t


def _alerts(settings: KafkaSettings, until: int, timeout: float = 60) -> list[dict]:
    import json

    c = reader(settings, topics.ALERTS)
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (
        not seen or max(len(a["evidence"]) for a in seen) < until
    ):
        for recs in c.poll(timeout_ms=200).values():
            seen.extend(json.loads(r.value) for r in recs)
    time.sleep(1.0)
    for recs in c.poll(timeout_ms=500).values():
        seen.extend(json.loads(r.value) for r in recs)
    c.close()
    return seen


def test_restart_rebuilds_state_and_continues_versions(models: Models) -> None:
    with EmbeddedBroker() as b:
        settings = KafkaSettings(bootstrap_servers=b.bootstrap_servers)
        ensure_topics(settings)
        p = make_producer(settings)
        first = [
            _embedding(models, f"r-{i}", t)
            for i, t in enumerate(
                ["fire in the warehouse, big flames", "black smoke over the warehouse roof"]
            )
        ]
        for raw in first:
            p.send(topics.EMBEDDINGS, key=b"inc:R1", value=raw)
        p.flush()
        svc, t = _run(settings, models.fusion)
        before = _alerts(settings, until=2)
        svc.stop.set()
        t.join(30)
        assert before and max(len(a["evidence"]) for a in before) == 2
        last_version = max(a["version"] for a in before)

        # Redeliver an old event and add a new one while fusion is down.
        p.send(topics.EMBEDDINGS, key=b"inc:R1", value=first[0])
        p.send(
            topics.EMBEDDINGS,
            key=b"inc:R1",
            value=_embedding(models, "r-2", "firefighters on scene of the fire"),
        )
        p.flush()
        svc2, t2 = _run(settings, models.fusion)
        after = _alerts(settings, until=3)
        svc2.stop.set()
        t2.join(30)
        p.close()
    versions = Counter(a["version"] for a in after)
    assert all(n == 1 for n in versions.values()), f"a version was emitted twice: {versions}"
    assert max(versions) == last_version + 1
    newest = max(after, key=lambda a: a["version"])
    assert sorted(newest["evidence"]) == ["r-0", "r-1", "r-2"]
    assert len({a["alert_id"] for a in after}) == 1
