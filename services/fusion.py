"""The fusion service: per correlation key, keep the evidence, label it, emit versioned alerts.

Alerts are a pure function of an incident's evidence: an alert version is emitted when the
evidence set differs from the last emitted one and the head is confident (or the incident
has waited ``pending_s`` without becoming confident). State is rebuilt on partition
assignment from ``city.embeddings`` (up to the committed offset) and ``city.alerts``, so a
crash or restart loses nothing and does not re-emit what was already published.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from models.continual import HeadWatcher
from models.fusion import Evidence, FusionModel, Prediction
from services import metrics
from services.base import BatchService, Output
from streams import topics
from streams.clients import KafkaSettings, assign_all, make_consumer
from streams.correlation import alert_id, incident_of
from streams.errors import RejectedInput
from streams.schemas import Alert, Embedding, parse_ts, utc_now
from streams.serde import from_bytes, to_bytes
from streams.settings import defaults

log = logging.getLogger(__name__)


@dataclass
class Incident:
    """What fusion knows about one correlation key."""

    key: str
    # event_id -> embedding, in arrival order (the first one names the alert).
    events: dict[str, Embedding] = field(default_factory=dict)
    # The same events' vectors, decoded once on arrival rather than at every decision.
    vectors: dict[str, Evidence] = field(default_factory=dict)
    emitted_version: int = 0
    emitted_evidence: frozenset[str] = frozenset()
    first_seen: float = field(default_factory=time.monotonic)

    @property
    def alert_id(self) -> str:
        return alert_id(self.key, next(iter(self.events)))

    def evidence(self) -> list[Evidence]:
        return list(self.vectors.values())


def build_alert(inc: Incident, pred: Prediction, model_version: str, version: int) -> Alert:
    """The alert for an incident's current evidence."""
    events = list(inc.events.values())
    first = min(events, key=lambda e: parse_ts(e.ts))
    located = next((e for e in events if e.location is not None), None)
    area = next((e.area for e in events if e.area), None)
    transcript = next((e.transcript for e in events if e.transcript), None)
    return Alert(
        alert_id=inc.alert_id,
        version=version,
        incident_id=incident_of(inc.key, first.incident_id),
        correlation_key=inc.key,
        label=pred.label,
        confidence=pred.confidence,
        probs=pred.probs,
        modalities=pred.modalities,
        contributions=pred.contributions,
        evidence=list(inc.events),
        location=located.location if located else None,
        area=area,
        transcript=transcript[:200] if transcript else None,
        first_event_ts=first.ts,
        emitted_ts=utc_now(),
        model_version=model_version,
        last_ingest_ts=max((e.ingest_ts for e in events), key=lambda s: parse_ts(s)),
    )


class FusionService(BatchService):
    """Consumes ``city.embeddings``, produces ``city.alerts``."""

    name = "fusion"
    input_topics = (topics.EMBEDDINGS,)

    def __init__(
        self,
        settings: KafkaSettings,
        model: FusionModel,
        stop: threading.Event | None = None,
        threshold: float | None = None,
        pending_s: float | None = None,
        ttl_s: float | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(settings, stop, **kw)
        self.model = model
        # Continual learning (models/continual.py): a head that `cityfuse learn` points the
        # model folder at is picked up between batches, without a restart.
        self.head_watch = HeadWatcher.default()
        conf = defaults().fusion
        self.threshold = conf.threshold if threshold is None else threshold
        self.pending_s = conf.pending_s if pending_s is None else pending_s
        self.ttl_s = conf.ttl_s if ttl_s is None else ttl_s
        self.incidents: dict[str, Incident] = {}
        self._assigned: list[TopicPartition] = []  # set by the rebalance listener
        self._lock = threading.Lock()

    # -- state -------------------------------------------------------------------------
    def add(self, emb: Embedding) -> Incident | None:
        """Add one embedding to its incident; None when the event is already known (redelivery).

        Raises ValueError when the vector does not decode (nothing is stored then)."""
        inc = self.incidents.get(emb.correlation_key)
        if inc is not None and emb.event_id in inc.events:
            return None
        evidence = Evidence(emb.modality, emb.array(), emb.text_array())
        inc = self.incidents.setdefault(emb.correlation_key, Incident(emb.correlation_key))
        inc.events[emb.event_id] = emb
        inc.vectors[emb.event_id] = evidence
        return inc

    def decide(self, inc: Incident, force: bool = False) -> Output | None:
        """Emit a new alert version if the evidence changed and we are confident (or forced)."""
        evidence_ids = frozenset(inc.events)
        if evidence_ids == inc.emitted_evidence:
            return None
        try:
            pred = self.model.predict(inc.evidence())
        except Exception as e:
            raise RejectedInput("fuse", "fusion_error", f"{type(e).__name__}: {e}") from e
        if pred.confidence < self.threshold and not force and inc.emitted_version == 0:
            return None
        inc.emitted_version += 1
        inc.emitted_evidence = evidence_ids
        alert = build_alert(inc, pred, self.model.version, inc.emitted_version)
        metrics.ALERTS.labels(alert.label).inc()
        if alert.last_ingest_ts:
            lag = (parse_ts(alert.emitted_ts) - parse_ts(alert.last_ingest_ts)).total_seconds()
            metrics.ALERT_LATENCY.observe(max(lag, 0.0))
        return Output(topics.ALERTS, alert.alert_id, to_bytes(alert))

    # -- loop hooks --------------------------------------------------------------------
    def process(self, records: list[ConsumerRecord]) -> Iterable[Output]:
        outs: list[Output] = []
        touched: dict[str, Incident] = {}
        with self._lock:
            for rec in records:
                try:
                    inc = self.add(from_bytes(Embedding, rec.value or b""))
                    if inc is not None:
                        touched[inc.key] = inc
                except (RejectedInput, ValueError) as e:
                    err = (
                        e
                        if isinstance(e, RejectedInput)
                        else RejectedInput("fuse", "embedding_invalid", str(e))
                    )
                    outs.append(self.reject(err, rec))
            for inc in touched.values():
                try:
                    out = self.decide(inc)
                except RejectedInput as e:
                    log.error("fusion failed for %s: %s", inc.key, e)
                    continue
                if out:
                    outs.append(out)
        return outs

    def on_idle(self) -> Iterable[Output]:
        """Emit incidents that waited ``pending_s`` without a confident label; forget stale ones."""
        now = time.monotonic()
        outs = []
        with self._lock:
            for key, inc in list(self.incidents.items()):
                if inc.emitted_version == 0 and now - inc.first_seen >= self.pending_s:
                    try:
                        out = self.decide(inc, force=True)
                    except RejectedInput:
                        out = None
                    if out:
                        outs.append(out)
                if now - inc.first_seen > self.ttl_s:
                    del self.incidents[key]
        return outs

    def on_start(self) -> None:
        assert self.consumer is not None
        self.consumer.unsubscribe()
        self.consumer.subscribe(list(self.input_topics), listener=_Rebuild(self))

    def _maybe_new_head(self) -> None:
        """Switch to a newly learned head (same input sizes) before the next batch is used."""
        head = self.head_watch.check()
        if head is not None and dict(head.head.dims) == dict(self.model.head.dims):
            log.info("fusion head %s -> %s", self.model.version, head.version)
            self.model = head

    def _poll_batch(self) -> list[ConsumerRecord]:
        batch = super()._poll_batch()
        self._maybe_new_head()
        # The listener runs on kafka-python's IO thread, where blocking calls are forbidden:
        # it only notes the assignment, and the rebuild happens here, before the batch is used.
        if self._assigned:
            assigned, self._assigned = self._assigned, []
            self.rebuild(assigned)
        return batch

    # -- restart -------------------------------------------------------------------------
    def rebuild(self, partitions: list[TopicPartition]) -> None:
        """Load evidence up to the committed offsets of ``partitions`` and the alerts already
        published, so redelivered records are recognised and no version is emitted twice."""
        assert self.consumer is not None
        committed = {tp: self.consumer.committed(tp) or 0 for tp in partitions}
        wanted = {tp: off for tp, off in committed.items() if off > 0}
        with self._lock:
            for rec in _read_until(self.settings, wanted):
                try:
                    self.add(from_bytes(Embedding, rec.value or b""))
                except (RejectedInput, ValueError):
                    continue  # rejected when first seen: its dead letter already exists
            if not wanted:
                return
            last: dict[str, Alert] = {}
            for rec in _read_all(self.settings, topics.ALERTS):
                try:
                    a = from_bytes(Alert, rec.value or b"")
                except RejectedInput:
                    continue
                if a.alert_id not in last or a.version > last[a.alert_id].version:
                    last[a.alert_id] = a
            for inc in self.incidents.values():
                prev = last.get(inc.alert_id)
                if prev is not None:
                    inc.emitted_version = prev.version
                    inc.emitted_evidence = frozenset(prev.evidence)
        log.info("fusion rebuilt %d incidents from %d partitions", len(self.incidents), len(wanted))


class _Rebuild(ConsumerRebalanceListener):
    def __init__(self, svc: FusionService) -> None:
        self.svc = svc

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        pass

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.svc._assigned = list(assigned)


def _read_until(
    settings: KafkaSettings, stop_at: dict[TopicPartition, int]
) -> Iterable[ConsumerRecord]:
    """Records of each partition from offset 0 up to (excluding) ``stop_at[tp]``."""
    if not stop_at:
        return
    consumer = make_consumer(settings, None, enable_auto_commit=False)
    try:
        consumer.assign(list(stop_at))
        consumer.seek_to_beginning()
        left = dict(stop_at)
        idle = 0
        while left and idle < 20:
            got = consumer.poll(timeout_ms=250)
            idle = 0 if got else idle + 1
            for tp, recs in got.items():
                for rec in recs:
                    if tp in left and rec.offset < left[tp]:
                        yield rec
                if tp in left and consumer.position(tp) >= left[tp]:
                    del left[tp]
    finally:
        consumer.close()


def _read_all(settings: KafkaSettings, topic: str) -> Iterable[ConsumerRecord]:
    """Every record of a topic up to its current high watermark."""
    consumer = make_consumer(settings, None, enable_auto_commit=False)
    try:
        assign_all(consumer, topic)
        consumer.seek_to_beginning()
        idle = 0
        # Tansu's LATEST offsets are wrong (STACK-NOTES §6): read until polls come back empty.
        while idle < 4:
            got = consumer.poll(timeout_ms=250)
            idle = 0 if got else idle + 1
            for recs in got.values():
                yield from recs
    finally:
        consumer.close()
