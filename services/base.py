"""The micro-batching consume → process → produce → flush → check → commit loop every service shares.

What the loop guarantees (issue 11, point 3):

* every per-record failure becomes a ``city.dlq`` record with a stage and a reason, and the
  service goes on: :meth:`BatchService.process` handles the failures it knows, and an
  unexpected exception out of ``process`` is bisected over the batch here, so only the records
  that fail on their own are dead-lettered;
* nothing is committed before every output of the batch is acknowledged by the broker: a failed
  send is retried, and after the last retry the service stops with :class:`DeliveryError`
  (uncommitted: the batch is redelivered to whoever takes the partitions over);
* a commit refused because the group rebalanced (``CommitFailedError``) is logged and the loop
  polls again: the records are redelivered to their new owner (at-least-once);
* timers (:meth:`BatchService.on_idle`) run on every loop iteration, busy or idle.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)

from services import metrics
from streams import topics
from streams.clients import KafkaSettings, make_consumer, make_producer
from streams.errors import RejectedInput, Stage
from streams.serde import dead_letter, to_bytes
from streams.settings import defaults

log = logging.getLogger(__name__)

# A commit refused because the group moved on: the records go to the partitions' new owner.
REBALANCE_ERRORS = (
    CommitFailedError,
    RebalanceInProgressError,
    IllegalGenerationError,
    UnknownMemberIdError,
)


class DeliveryError(RuntimeError):
    """Outputs of a batch could not be delivered after every retry (the batch is not committed)."""


class Output:
    """One record to produce."""

    __slots__ = ("key", "topic", "value")

    def __init__(self, topic: str, key: str | None, value: bytes) -> None:
        self.topic, self.key, self.value = topic, key, value


class BatchService(ABC):
    """A consumer-group service: poll up to ``batch_max`` records or ``batch_ms``, process the
    batch in one go, produce its outputs, flush and check every send, then commit
    (at-least-once).

    ``stop`` (a threading.Event) ends the loop after the batch in hand is committed.
    """

    name: str = "service"
    input_topics: tuple[str, ...] = ()
    # The DLQ stage of a record whose processing raised something unexpected.
    failure_stage: Stage = "infer"

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
        conf = defaults()
        batch = conf.batch[self.name]
        self.batch_max = batch_max or batch.max
        self.batch_ms = batch_ms or batch.ms
        self.group_id = group_id or f"cityfuse-{self.name}"
        self.send_retries = conf.limits.send_retries
        self.send_backoff_s = conf.limits.send_backoff_s
        # Set once the group join gave this member its partitions (or the service ended).
        self.ready = threading.Event()
        self.consumer: KafkaConsumer | None = None
        self.producer: KafkaProducer | None = None

    @abstractmethod
    def process(self, records: list[ConsumerRecord]) -> Iterable[Output]:
        """Turn a batch into outputs; raise RejectedInput per record via :meth:`reject`."""

    def on_idle(self) -> Iterable[Output]:
        """Outputs due by the clock rather than by input (timers); none by default.

        Called on EVERY loop iteration, after the batch (if any) is processed, so timers keep
        running under steady traffic too. The fusion service overrides it (keep the name)."""
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

    # -- processing that never raises for one bad record --------------------------------
    def process_guarded(self, records: list[ConsumerRecord]) -> list[Output]:
        """:meth:`process`, with an unexpected exception bisected down to the failing records.

        A record that fails alone is dead-lettered (``failure_stage``/``unexpected_error``);
        the others are processed normally. Processing is idempotent per record in every
        service (fusion ignores an event it already holds), so re-running a half is safe."""
        try:
            return list(self.process(records))
        except Exception as e:
            if len(records) == 1:
                log.exception("%s: record failed", self.name)
                err = RejectedInput(
                    self.failure_stage, "unexpected_error", f"{type(e).__name__}: {e}"[:500]
                )
                return [self.reject(err, records[0])]
        mid = len(records) // 2
        return self.process_guarded(records[:mid]) + self.process_guarded(records[mid:])

    def _timers(self) -> list[Output]:
        try:
            return list(self.on_idle())
        except Exception:
            # A timer has no input record to dead-letter: log it and try again next iteration.
            log.exception("%s: timer failed", self.name)
            metrics.ERRORS.labels(self.name, "timer").inc()
            return []

    # -- Kafka I/O ---------------------------------------------------------------------
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

    def _send_once(self, outputs: Sequence[Output]) -> list[tuple[Output, Exception]]:
        """Send, flush and check every future; the outputs that failed, with their errors."""
        assert self.producer is not None
        futures = []
        failed: list[tuple[Output, Exception]] = []
        for out in outputs:
            try:
                fut = self.producer.send(
                    out.topic,
                    key=out.key.encode() if out.key is not None else None,
                    value=out.value,
                )
            except Exception as e:  # too large, metadata timeout, closed producer ...
                failed.append((out, e))
                continue
            futures.append((out, fut))
        self.producer.flush()
        for out, fut in futures:
            try:
                # flush() has waited for every request: this returns or raises at once.
                fut.get(timeout=0.1)
            except Exception as e:
                failed.append((out, e))
        return failed

    def deliver(self, outputs: Sequence[Output]) -> None:
        """Produce ``outputs`` and make sure the broker has every one of them.

        Failed sends are retried ``send_retries`` times with a doubling back-off; then
        :class:`DeliveryError` is raised and the batch stays uncommitted."""
        pending = list(outputs)
        for attempt in range(self.send_retries + 1):
            failed = self._send_once(pending)
            if not failed:
                return
            metrics.ERRORS.labels(self.name, "send").inc(len(failed))
            log.warning(
                "%s: %d of %d sends failed (attempt %d): %s",
                self.name,
                len(failed),
                len(pending),
                attempt + 1,
                failed[0][1],
            )
            pending = [out for out, _ in failed]
            if attempt < self.send_retries and not self.stop.wait(self.send_backoff_s * 2**attempt):
                continue
        raise DeliveryError(
            f"{self.name}: {len(pending)} outputs not delivered after "
            f"{self.send_retries + 1} attempts: {failed[0][1]!r}"
        )

    def commit(self) -> bool:
        """Commit the consumed offsets; False when a rebalance took the partitions away."""
        assert self.consumer is not None
        try:
            self.consumer.commit()
            return True
        except REBALANCE_ERRORS as e:
            # Our outputs are delivered; the new owner will process the batch again
            # (at-least-once; fusion recognises redelivered events).
            metrics.ERRORS.labels(self.name, "commit").inc()
            log.warning("%s: commit refused during a rebalance, polling again: %s", self.name, e)
            return False

    def run(self) -> None:
        """Serve until ``stop`` is set. Raises :class:`DeliveryError` when outputs cannot be
        delivered (nothing of that batch is committed)."""
        self.consumer = make_consumer(self.settings, self.group_id, *self.input_topics)
        self.producer = make_producer(self.settings)
        try:
            self.on_start()
            while not self.stop.is_set():
                batch = self._poll_batch()
                if not self.ready.is_set() and self.consumer.assignment():
                    self.ready.set()
                outputs: list[Output] = []
                if batch:
                    t0 = time.perf_counter()
                    outputs = self.process_guarded(batch)
                    metrics.BATCH_SECONDS.labels(self.name).observe(time.perf_counter() - t0)
                    metrics.RECORDS_IN.labels(self.name).inc(len(batch))
                outputs += self._timers()
                if outputs:
                    self.deliver(outputs)
                    metrics.RECORDS_OUT.labels(self.name).inc(len(outputs))
                if batch:
                    self.commit()
        finally:
            self.ready.set()
            try:
                self.producer.close(timeout=10)  # flushes what is pending first
            except Exception:
                # Never hide the error that ended the loop behind a failing close.
                log.exception("%s: closing the producer failed", self.name)
            finally:
                self.consumer.close()
