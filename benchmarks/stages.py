"""The stages after the encoders, measured for capacity planning: fusion and the broker."""

from __future__ import annotations

import time
from typing import Any

from kafka.consumer.fetcher import ConsumerRecord

from benchmarks.samples import Sample
from models.fusion import FusionModel
from services.fusion import FusionService
from streams import topics
from streams.broker import EmbeddedBroker
from streams.clients import KafkaSettings, ensure_topics, make_producer


def fusion_rate(model: FusionModel, embeddings: list[bytes], batch: int = 64) -> dict[str, Any]:
    """Fusion's ``process`` (parse, add to incident state, label, alert) on served embeddings,
    without Kafka; every event is its own incident here (the most labelling work)."""
    svc = FusionService(KafkaSettings(), model)
    recs = [
        ConsumerRecord(
            topics.EMBEDDINGS,
            0,
            -1,
            i,
            int(time.time() * 1000),
            0,
            None,
            v,
            [],
            None,
            -1,
            len(v),
            -1,
        )
        for i, v in enumerate(embeddings)
    ]
    t0 = time.perf_counter()
    alerts = 0
    for i in range(0, len(recs), batch):
        alerts += sum(o.topic == topics.ALERTS for o in svc.process(recs[i : i + batch]))
    seconds = time.perf_counter() - t0
    return {
        "events": len(recs),
        "alerts": alerts,
        "seconds": seconds,
        "events_per_s": len(recs) / seconds if seconds else 0.0,
        "mean_embedding_bytes": sum(map(len, embeddings)) / max(1, len(embeddings)),
    }


def broker_rate(frames: list[Sample], n: int) -> dict[str, Any]:
    """Producing ``n`` inline frames (acks=all) into a fresh embedded broker, nobody consuming."""
    with EmbeddedBroker() as broker:
        live = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        ensure_topics(live)
        values = [frames[i % len(frames)].value(f"broker-{i}") for i in range(n)]
        producer = make_producer(live)
        t0 = time.perf_counter()
        for v in values:
            producer.send(topics.FRAMES, value=v)
        producer.flush()
        seconds = time.perf_counter() - t0
        producer.close()
    size = sum(map(len, values))
    return {
        "messages": n,
        "seconds": seconds,
        "messages_per_s": n / seconds,
        "mb_per_s": size / seconds / 1e6,
        "mean_frame_message_bytes": size / n,
    }
