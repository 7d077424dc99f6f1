"""The micro-batching consume → process → produce → flush → commit loop every service shares."""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable

from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord

from services import metrics
from streams import topics
from streams.clients import KafkaSettings, make_consumer, make_producer
from streams.errors import RejectedInput
from streams.serde import dead_letter, to_bytes
from streams.settings import defaults

log = logging.getLogger(__name__)


class Output:
    """One record to produce."""

    __slots__ = ("key", "topic", "value")

    def __init__(self, topic: str, key: str | None, value: bytes) -> None:
        self.topic, self.key, self.value = topic, key, value


class BatchService(ABC):
    """A consumer-group service: poll up to ``batch_max`` records or ``batch_ms``, process the
    batch in one go, produce its outputs, flush, then commit (at-least-once).

    ``stop`` (a threading.Event) ends the loop after the batch in hand is committed.
    """

    name: str = "service"
    input_topics: tuple[str, ...] = ()

    def __init__(
        self,
        settings: KafkaSettings,
        stop: threading.Event | None = None,
        batch_max: int | None = None,
        batch_ms: int | None = None,
        group_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.stop = stop or threading.Event()
        batch = defaults().batch[self.name]
        self.batch_max = batch_max or batch.max
        self.batch_ms = batch_ms or batch.ms
        self.group_id = group_id or f"cityfuse-{self.name}"
        # Set once the group join gave this member its partitions (or the service ended).
        self.ready = threading.Event()
        self.consumer: KafkaConsumer | None = None
        self.producer: KafkaProducer | None = None

    @abstractmethod
    def process(self, records: list[ConsumerRecord]) -> Iterable[Output]:
        """Turn a batch into outputs; raise RejectedInput per record via :meth:`reject`."""

    def on_idle(self) -> Iterable[Output]:
        """Outputs due without new input (timers); none by default."""
        return ()

    def on_start(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """Hook run once the clients exist, before the first poll."""

    def reject(self, err: RejectedInput, rec: ConsumerRecord) -> Output:
        """The DLQ output for a bad record (keyed like the original)."""
        metrics.DLQ.labels(self.name, err.stage, err.reason).inc()
        log.warning(
            "%s: %s/%s at %s[%s]@%s: %s",
            self.name,
            err.stage,
            err.reason,
            rec.topic,
            rec.partition,
            rec.offset,
            err.detail,
        )
        dl = dead_letter(err, rec.topic, rec.value or b"", rec.key, rec.partition, rec.offset)
        key = rec.key.decode("utf-8", "replace") if rec.key is not None else None
        return Output(topics.DLQ, key, to_bytes(dl))

    def _poll_batch(self) -> list[ConsumerRecord]:
        assert self.consumer is not None
        batch: list[ConsumerRecord] = []
        deadline = time.monotonic() + self.batch_ms / 1000
        while len(batch) < self.batch_max and not self.stop.is_set():
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            got = self.consumer.poll(timeout_ms=left_ms, max_records=self.batch_max - len(batch))
            for recs in got.values():
                batch.extend(recs)
        return batch

    def _send(self, outputs: Iterable[Output]) -> int:
        assert self.producer is not None
        n = 0
        for out in outputs:
            self.producer.send(
                out.topic, key=out.key.encode() if out.key is not None else None, value=out.value
            )
            n += 1
        return n

    def run(self) -> None:
        """Serve until ``stop`` is set."""
        self.consumer = make_consumer(self.settings, self.group_id, *self.input_topics)
        self.producer = make_producer(self.settings)
        try:
            self.on_start()
            while not self.stop.is_set():
                batch = self._poll_batch()
                if not self.ready.is_set() and self.consumer.assignment():
                    self.ready.set()
                if batch:
                    t0 = time.perf_counter()
                    sent = self._send(self.process(batch))
                    metrics.BATCH_SECONDS.labels(self.name).observe(time.perf_counter() - t0)
                    metrics.RECORDS_IN.labels(self.name).inc(len(batch))
                    metrics.RECORDS_OUT.labels(self.name).inc(sent)
                    self.producer.flush()
                    self.consumer.commit()
                elif self._send(self.on_idle()):
                    self.producer.flush()
        finally:
            self.ready.set()
            self.producer.flush()
            self.producer.close()
            self.consumer.close()
