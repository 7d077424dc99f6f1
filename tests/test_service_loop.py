"""The shared service loop (services/base.py) on the real broker: nothing lost, nothing fatal.

The services here are small subclasses of the real loop with a fault injected at one place
(a poisoned input, an oversized output); Kafka, the client and the text model are real."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

import pytest
from kafka import KafkaAdminClient
from kafka.consumer.fetcher import ConsumerRecord

from services.base import BatchService, DeliveryError, Output
from services.encoders import TextService
from services.serve import ServiceDied, run_services
from streams import topics
from streams.clients import MAX_REQUEST_BYTES, KafkaSettings, ensure_topics
from tests.kafka_helpers import event, reader, send


def _topic(settings: KafkaSettings, partitions: int = 1) -> str:
    name = f"test.loop.{uuid.uuid4().hex[:8]}"
    ensure_topics(settings, (topics.TopicSpec(name, partitions=partitions),))
    return name


def _committed(settings: KafkaSettings, group: str, topic: str) -> int:
    admin = KafkaAdminClient(**settings.common())
    try:
        offsets = admin.list_group_offsets(group)
    finally:
        admin.close()
    per_tp = offsets.get(group, offsets)
    return sum(o.offset for tp, o in per_tp.items() if tp.topic == topic and o.offset > 0)


def _run_until(svc: BatchService, done: Any, timeout: float = 90) -> None:
    t = threading.Thread(target=svc.run, daemon=True)
    t.start()
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline and t.is_alive():
        time.sleep(0.1)
    svc.stop.set()
    t.join(30)


class _Huge(BatchService):
    """Answers every record with an output larger than the producer may send."""

    name = "text"

    def process(self, records: list[ConsumerRecord]) -> Iterable[Output]:
        return [Output(self.out_topic, None, b"x" * (MAX_REQUEST_BYTES + 1)) for _ in records]


def test_failed_send_means_no_commit_and_a_loud_stop(settings: KafkaSettings) -> None:
    src = _topic(settings)
    group = f"g-{uuid.uuid4().hex[:6]}"
    svc = _Huge(settings, group_id=group, batch_ms=200)
    svc.input_topics = (src,)
    svc.out_topic = _topic(settings)  # type: ignore[attr-defined]
    svc.send_backoff_s = 0.01
    send(settings, src, b'{"n": 1}')
    with pytest.raises(DeliveryError, match="not delivered after 4 attempts"):
        svc.run()
    assert _committed(settings, group, src) == 0


class _Poisoned(TextService):
    """The real text service and MiniLM/e5, with a forward pass that fails on one input."""

    calls = 0

    def embed(self, inputs: list[Any]) -> list[dict[str, Any]]:
        self.calls += 1
        if any("POISON" in t for t in inputs):
            raise RuntimeError("forward pass failed")
        return super().embed(inputs)

    def process(self, records: list[ConsumerRecord]) -> Iterable[Output]:
        if any(r.value == b"crash-in-process" for r in records):
            raise KeyError("an unexpected bug")
        return super().process(records)


def test_inference_error_dead_letters_only_the_failing_record(
    settings: KafkaSettings, models: Any
) -> None:
    src = _topic(settings)
    tag = uuid.uuid4().hex[:8]
    texts = [f"{tag} smoke from a bus {i}" for i in range(7)]
    texts[4] = f"{tag} POISON report"
    for t in texts:
        send(settings, src, event(text=t, incident_id=tag))
    send(settings, src, b"crash-in-process")
    svc = _Poisoned(settings, models.text, group_id=f"g-{tag}", batch_max=64, batch_ms=1500)
    svc.input_topics = (src,)
    emb, dlq = reader(settings, topics.EMBEDDINGS), reader(settings, topics.DLQ)
    got_emb: list[dict[str, Any]] = []
    got_dlq: list[dict[str, Any]] = []

    def done() -> bool:
        for c, into in ((emb, got_emb), (dlq, got_dlq)):
            for recs in c.poll(timeout_ms=100).values():
                for r in recs:
                    v = json.loads(r.value)
                    if v.get("incident_id") == tag or v.get("topic") == src:
                        into.append(v)
        return len(got_emb) >= 6 and len(got_dlq) >= 2

    _run_until(svc, done)
    emb.close()
    dlq.close()
    assert len(got_emb) == 6
    reasons = sorted((d["stage"], d["reason"]) for d in got_dlq)
    assert reasons == [("infer", "inference_error"), ("infer", "unexpected_error")]
    assert _committed(settings, f"g-{tag}", src) == 8
    # Bisection: the batch, then halves down to the poisoned record, not one call per record.
    assert 3 <= svc.calls < 1 + 2 * 7


class _Ticking(BatchService):
    """Counts timer calls that came right after a non-empty batch."""

    name = "text"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.last_batch = 0
        self.busy_ticks = 0
        self.seen = 0

    def process(self, records: list[ConsumerRecord]) -> Iterable[Output]:
        self.last_batch = len(records)
        self.seen += len(records)
        return ()

    def on_idle(self) -> Iterable[Output]:
        if self.last_batch:
            self.busy_ticks += 1
        self.last_batch = 0
        return ()


def test_timers_run_under_steady_traffic(settings: KafkaSettings) -> None:
    src = _topic(settings)
    svc = _Ticking(settings, group_id=f"g-{uuid.uuid4().hex[:6]}", batch_max=1, batch_ms=1000)
    svc.input_topics = (src,)
    for i in range(5):
        send(settings, src, f'{{"n": {i}}}'.encode())
    _run_until(svc, lambda: svc.seen >= 5)
    assert svc.seen == 5
    # Every poll came back full (batch_max=1, a backlog), and the timer still ran each time.
    assert svc.busy_ticks == 5


class _Broken(BatchService):
    name = "sink"

    def process(self, records: list[ConsumerRecord]) -> Iterable[Output]:
        return ()

    def on_start(self) -> None:
        raise OSError("cannot start")


class _Quiet(BatchService):
    name = "fusion"

    def process(self, records: list[ConsumerRecord]) -> Iterable[Output]:
        return ()


def test_serve_stops_everything_and_fails_when_one_service_dies(settings: KafkaSettings) -> None:
    stop = threading.Event()
    quiet = _Quiet(settings, stop, group_id=f"g-{uuid.uuid4().hex[:6]}")
    quiet.input_topics = (_topic(settings),)
    broken = _Broken(settings, stop, group_id=f"g-{uuid.uuid4().hex[:6]}")
    broken.input_topics = (_topic(settings),)
    with pytest.raises(ServiceDied, match="sink: OSError: cannot start"):
        run_services([quiet, broken], stop)
    assert stop.is_set()
    assert quiet.consumer is not None and quiet.consumer._closed
