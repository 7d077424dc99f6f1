"""Fusion state survives a restart: nothing lost, no version emitted twice."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

from models.fusion import FusionModel
from services.fusion import FusionService
from services.runtime import Models
from streams import topics
from streams.broker import EmbeddedBroker
from streams.clients import KafkaSettings, ensure_topics, make_producer
from streams.schemas import Embedding, EncoderRef, encode_vector, utc_now
from streams.serde import to_bytes
from tests.kafka_helpers import reader


def _embedding(models: Models, event_id: str, text: str, incident: str = "R1") -> bytes:
    v = models.text.encode([text])[0]
    return to_bytes(
        Embedding(
            event_id=event_id,
            modality="text",
            correlation_key=f"inc:{incident}",
            ts=utc_now(),
            incident_id=incident,
            vector=encode_vector(v),
            dim=v.shape[0],
            encoder=EncoderRef(name=models.text.name, version=models.text.version),
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


def test_offset_at_finds_a_time_on_tansu_whatever_offsets_for_times_says() -> None:
    from kafka import TopicPartition

    from services.fusion_state import high_watermark, offset_at
    from streams.clients import make_consumer

    with EmbeddedBroker() as b:
        settings = KafkaSettings(bootstrap_servers=b.bootstrap_servers)
        ensure_topics(settings)
        p = make_producer(settings)
        base = int(time.time() * 1000) - 3_600_000
        for i in range(40):  # one record every 10 s of record time, one batch each
            p.send(topics.FEEDBACK, key=b"k", value=b"x", timestamp_ms=base + i * 10_000).get(10)
        p.close()
        c = make_consumer(settings, None)
        partitions = c.partitions_for_topic(topics.FEEDBACK) or set()
        (tp,) = [
            TopicPartition(topics.FEEDBACK, n)
            for n in partitions
            if high_watermark(c, TopicPartition(topics.FEEDBACK, n)) > 0
        ]
        end = high_watermark(c, tp)
        assert end == 40
        for i in (0, 1, 17, 39):
            assert offset_at(c, tp, base + i * 10_000 - 5_000, end) == i
        assert offset_at(c, tp, base + 400_000, end) == end
        c.close()


def test_rebuild_reads_only_the_ttl_window_and_drops_on_reassignment(models: Models) -> None:
    with EmbeddedBroker() as b:
        settings = KafkaSettings(bootstrap_servers=b.bootstrap_servers)
        ensure_topics(settings)
        p = make_producer(settings)
        old = int(time.time() * 1000) - 3 * 3_600_000  # long past a 1 h TTL
        for i in range(5):
            raw = _embedding(models, f"old-{i}", "flooded underpass, cars stuck", "OLD")
            p.send(topics.EMBEDDINGS, key=b"inc:OLD", value=raw, timestamp_ms=old + i).get(10)
        for i in range(2):
            raw = _embedding(models, f"new-{i}", "smoke pouring from a shop", "NEW")
            p.send(topics.EMBEDDINGS, key=b"inc:NEW", value=raw).get(10)
        p.close()
        # A previous member committed everything: rebuild has 7 records to consider.
        new = {"new-0", "new-1"}
        # First member: everything is new to the group, all 7 are processed live; the old
        # incident expires at the first timer (its last activity was 3 h ago).
        svc = _member(settings, models.fusion, "ttl-test", until=lambda s: new <= set(s.by_event))
        assert set(svc.by_event) == new
        # Second member of the same group: rebuilds from now - TTL up to the committed offsets,
        # so the 3-hour-old records are never read back.
        svc2 = _member(settings, models.fusion, "ttl-test", until=lambda s: bool(s.by_event))
        assert set(svc2.by_event) == new
        assert all(i.alert_id for i in svc2.incidents.values())  # adopted from city.alerts


def _member(
    settings: KafkaSettings, fusion: FusionModel, group: str, until: Callable[[FusionService], bool]
) -> FusionService:
    svc = FusionService(settings, fusion, ttl_s=3600, pending_s=0.5, group_id=group)
    t = threading.Thread(target=svc.run, daemon=True)
    t.start()
    assert svc.ready.wait(60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not until(svc):
        time.sleep(0.2)
    time.sleep(1.5)  # timers run (pending alerts out, expired incidents dropped)
    svc.stop.set()
    t.join(30)
    return svc
