"""The fusion service: correlate embeddings into incidents, label them, emit versioned alerts.

Correlation is :class:`streams.correlation.Correlator` (join within R metres and T minutes of an
open incident, by producer incident id, merge when one event shows two incidents are one). An
alert version is emitted when an incident's evidence changed and the head is confident (or the
incident waited ``pending_s``). Only the *owner* of an incident speaks for it: the member that
holds the partition of its anchor event's home routing key (border events reach several
members). State is rebuilt on every assignment from a time-bounded window of
``city.embeddings`` and ``city.alerts`` (services/fusion_state.py), so a crash or a rebalance
loses nothing and does not re-emit what was already published.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.partitioner.default import murmur2

from models.continual import HeadWatcher
from models.fusion import Evidence, FusionModel, Prediction
from services import metrics
from services.base import BatchService, Output
from streams import topics
from streams.correlation import (
    Correlator,
    Sighting,
    incident_alert_id,
    incident_of,
    owner_key,
    sighting,
)
from streams.errors import RejectedInput
from streams.schemas import Alert, Embedding, parse_ts, utc_now
from streams.serde import from_bytes, to_bytes
from streams.settings import defaults

log = logging.getLogger(__name__)

# Evidence ids remembered per incident for redelivery detection, in multiples of the cap
# on evidence kept (older ids are forgotten: a very late redelivery may count twice).
SEEN_FACTOR = 20


def partition_of(key: str, n_partitions: int) -> int:
    """The partition kafka-python's default partitioner sends ``key`` to."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % n_partitions


@dataclass
class Incident:
    """What fusion holds of one open incident: the newest ``cap`` events, a count, the anchor."""

    cid: str
    anchor: Sighting
    owner: str  # home routing key of the anchor event
    events: OrderedDict[str, Embedding] = field(default_factory=OrderedDict)
    vectors: OrderedDict[str, Evidence] = field(default_factory=OrderedDict)
    seen: OrderedDict[str, None] = field(default_factory=OrderedDict)
    count: int = 0
    first_ts: str = ""
    first_arrival_ms: int = 0
    last_arrival_ms: int = 0
    alert_id: str | None = None  # frozen at the first emitted version
    emitted_version: int = 0
    emitted_sig: tuple[int, frozenset[str]] | None = None
    superseded: list[str] = field(default_factory=list)

    def signature(self) -> tuple[int, frozenset[str]]:
        """What an alert version states about the evidence: its count and newest ids."""
        return (self.count, frozenset(self.events))

    def evidence(self) -> list[Evidence]:
        return list(self.vectors.values())


def build_alert(inc: Incident, pred: Prediction, model_version: str, version: int) -> Alert:
    """The alert for an incident's current evidence."""
    assert inc.alert_id is not None
    events = list(inc.events.values())
    located = next((e for e in events if e.location is not None), None)
    area = next((e.area for e in events if e.area), None)
    transcript = next((e.transcript for e in events if e.transcript), None)
    ids = {e.incident_id for e in events if e.incident_id}
    return Alert(
        alert_id=inc.alert_id,
        version=version,
        incident_id=incident_of(ids, inc.alert_id),
        correlation_key=inc.owner,
        label=pred.label,
        confidence=pred.confidence,
        probs=pred.probs,
        modalities=pred.modalities,
        contributions=pred.contributions,
        evidence=list(inc.events),
        evidence_count=inc.count,
        supersedes=list(inc.superseded) or None,
        location=located.location if located else None,
        area=area,
        transcript=transcript[:200] if transcript else None,
        first_event_ts=inc.first_ts,
        emitted_ts=utc_now(),
        model_version=model_version,
        last_ingest_ts=max((e.ingest_ts for e in events), key=lambda s: parse_ts(s)),
    )


class FusionService(BatchService):
    """Consumes ``city.embeddings``, produces ``city.alerts``."""

    name = "fusion"
    input_topics = (topics.EMBEDDINGS,)
    failure_stage = "fuse"

    def __init__(
        self,
        settings: Any,
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
        conf = defaults()
        self.threshold = conf.fusion.threshold if threshold is None else threshold
        self.pending_s = conf.fusion.pending_s if pending_s is None else pending_s
        self.ttl_s = conf.fusion.ttl_s if ttl_s is None else ttl_s
        self.cap = conf.limits.evidence_ids
        self.dims: dict[str, int] = dict(model.head.dims)
        self.reset()
        # None = every incident is ours (offline use); else the partitions of city.embeddings
        # this member holds, out of ``_n_partitions``.
        self.owned: set[int] | None = None
        self._n_partitions = 1
        self._assigned: list[TopicPartition] | None = None  # set by the rebalance listener
        self._last_clock = 0.0

    def reset(self) -> None:
        """Forget every incident (before a rebuild)."""
        self.correlator = Correlator()
        self.incidents: dict[str, Incident] = {}
        self.by_event: dict[str, str] = {}
        self.dirty: set[str] = set()

    # -- the door ----------------------------------------------------------------------
    def check(self, emb: Embedding) -> Evidence:
        """The head's evidence of an embedding, or RejectedInput (stage ``fuse``) when its
        encoder or vector size is not what the head was trained on."""
        # The head names the exact encoder versions it was trained on (models/train.py).
        trained_on = self.model.encoders
        if trained_on is not None and emb.encoder.version != trained_on.get(emb.modality):
            raise RejectedInput(
                "fuse",
                "encoder_mismatch",
                f"{emb.modality} from {emb.encoder.name} {emb.encoder.version!r}, "
                f"the head reads {trained_on.get(emb.modality)!r}",
            )

        want = self.dims.get(emb.modality)
        if emb.dim != want:
            raise RejectedInput("fuse", "vector_size", f"{emb.modality} dim {emb.dim} != {want}")
        if emb.text_dim is not None and emb.text_dim != self.dims.get("text"):
            raise RejectedInput("fuse", "vector_size", f"transcript dim {emb.text_dim}")
        try:
            return Evidence(emb.modality, emb.array(), emb.text_array())
        except ValueError as e:
            raise RejectedInput("fuse", "vector_size", str(e)) from e

    # -- state -------------------------------------------------------------------------
    def add(self, emb: Embedding, arrival_ms: int) -> Incident | None:
        """Add one embedding to its incident; None when the event is already held (a
        redelivery, or its copy under another routing key). Raises RejectedInput at the door
        (nothing is stored then, so a bad vector never poisons an incident)."""
        if emb.event_id in self.by_event:
            return None
        evidence = self.check(emb)
        s = sighting(emb.event_id, emb.ts, emb.location, emb.area, emb.incident_id)
        cid, merged = self.correlator.assign(s)
        inc = self.incidents.get(cid)
        if inc is None:
            key = owner_key(emb.location, emb.area, emb.incident_id, emb.event_id)
            inc = self.incidents[cid] = Incident(cid, s, key, first_ts=emb.ts)
            inc.first_arrival_ms = arrival_ms
        for other in merged:
            self._merge(inc, self.incidents.pop(other))
        if s.order < inc.anchor.order:
            inc.anchor = s
            inc.owner = owner_key(emb.location, emb.area, emb.incident_id, emb.event_id)
        if parse_ts(emb.ts) < parse_ts(inc.first_ts):
            inc.first_ts = emb.ts
        inc.events[emb.event_id] = emb
        inc.vectors[emb.event_id] = evidence
        while len(inc.events) > self.cap:
            inc.events.popitem(last=False)
            inc.vectors.popitem(last=False)
        self._remember(inc, emb.event_id)
        inc.count += 1
        inc.last_arrival_ms = max(inc.last_arrival_ms, arrival_ms)
        self.dirty.add(cid)
        return inc

    def _remember(self, inc: Incident, event_id: str) -> None:
        inc.seen[event_id] = None
        self.by_event[event_id] = inc.cid
        while len(inc.seen) > self.cap * SEEN_FACTOR:
            old, _ = inc.seen.popitem(last=False)
            self.by_event.pop(old, None)

    def _merge(self, inc: Incident, other: Incident) -> None:
        """Fold ``other`` into ``inc``: one alert survives, naming the one it supersedes."""
        self.dirty.discard(other.cid)
        if inc.alert_id is None and other.alert_id is not None:
            # Only the other one was published: keep its id, nothing is superseded.
            inc.alert_id, inc.emitted_version = other.alert_id, other.emitted_version
            inc.superseded = other.superseded
        elif other.alert_id is not None:
            inc.superseded = [*inc.superseded, other.alert_id, *other.superseded]
        if other.anchor.order < inc.anchor.order:
            inc.anchor, inc.owner = other.anchor, other.owner
        if parse_ts(other.first_ts) < parse_ts(inc.first_ts):
            inc.first_ts = other.first_ts
        for eid, emb in other.events.items():
            inc.events[eid] = emb
            inc.vectors[eid] = other.vectors[eid]
        while len(inc.events) > self.cap:
            inc.events.popitem(last=False)
            inc.vectors.popitem(last=False)
        for eid in other.seen:
            self._remember(inc, eid)
        inc.count += other.count
        inc.first_arrival_ms = min(inc.first_arrival_ms, other.first_arrival_ms)
        inc.last_arrival_ms = max(inc.last_arrival_ms, other.last_arrival_ms)
        self.dirty.add(inc.cid)

    def drop(self, cid: str) -> None:
        """Forget an incident (expired)."""
        inc = self.incidents.pop(cid)
        self.correlator.remove(cid)
        self.dirty.discard(cid)
        for eid in inc.seen:
            if self.by_event.get(eid) == cid:
                del self.by_event[eid]

    def owns(self, inc: Incident) -> bool:
        """Whether this member speaks for ``inc`` (it holds the anchor's home partition)."""
        return self.owned is None or partition_of(inc.owner, self._n_partitions) in self.owned

    def decide(self, inc: Incident, force: bool = False) -> Output | None:
        """Emit a new alert version if the evidence changed and we are confident (or forced)."""
        sig = inc.signature()
        if sig == inc.emitted_sig or not self.owns(inc):
            return None
        try:
            pred = self.model.predict(inc.evidence(), explain=False)
            if pred.confidence < self.threshold and not force and inc.emitted_version == 0:
                return None  # not emitted: no leave-one-out passes for contributions
            pred = self.model.explain(inc.evidence(), pred)
        except Exception as e:
            raise RejectedInput("fuse", "fusion_error", f"{type(e).__name__}: {e}") from e
        if inc.alert_id is None:
            inc.alert_id = incident_alert_id(inc.anchor.event_id)
        inc.emitted_version += 1
        inc.emitted_sig = sig
        alert = build_alert(inc, pred, self.model.version, inc.emitted_version)
        metrics.ALERTS.labels(alert.label).inc()
        if alert.last_ingest_ts:
            lag = (parse_ts(alert.emitted_ts) - parse_ts(alert.last_ingest_ts)).total_seconds()
            metrics.ALERT_LATENCY.observe(max(lag, 0.0))
        return Output(topics.ALERTS, alert.alert_id, to_bytes(alert))

    def _decide_dirty(self) -> list[Output]:
        outs = []
        for cid in sorted(self.dirty):
            inc = self.incidents.get(cid)
            if inc is None:
                continue
            try:
                out = self.decide(inc)
            except RejectedInput as e:
                log.error("fusion failed for %s: %s", cid, e)
                continue
            if out:
                outs.append(out)
        self.dirty.clear()
        return outs

    def clock(self, now_ms: int | None = None, every_s: float = 0.5) -> list[Output]:
        """Timers: emit incidents that waited ``pending_s`` without a confident label; drop
        incidents ``ttl_s`` after their last evidence reached ``city.embeddings`` (wall clock,
        from the record timestamps, so a rebuilt incident keeps its age). Runs at most every
        ``every_s``, whether called per batch or per loop iteration."""
        mono = time.monotonic()
        if now_ms is None and mono - self._last_clock < every_s:
            return []
        self._last_clock = mono
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        outs = []
        for cid, inc in list(self.incidents.items()):
            if now_ms - inc.last_arrival_ms > self.ttl_s * 1000:
                self.drop(cid)
            elif (
                inc.emitted_version == 0 and now_ms - inc.first_arrival_ms >= self.pending_s * 1000
            ):
                try:
                    out = self.decide(inc, force=True)
                except RejectedInput:
                    out = None
                if out:
                    outs.append(out)
        return outs

    # -- loop hooks --------------------------------------------------------------------
    def process(self, records: list[ConsumerRecord]) -> Iterable[Output]:
        outs: list[Output] = []
        for rec in records:
            try:
                emb = from_bytes(Embedding, rec.value or b"")
                self.add(emb, rec.timestamp)
            except RejectedInput as e:
                err = e if e.stage == "fuse" else RejectedInput("fuse", e.reason, e.detail)
                outs.append(self.reject(err, rec))
            except ValueError as e:
                outs.append(self.reject(RejectedInput("fuse", "embedding_invalid", str(e)), rec))
        outs += self._decide_dirty()
        # Timers also run here, so they keep running under steady traffic whatever the loop.
        outs += self.clock()
        return outs

    def on_idle(self) -> Iterable[Output]:
        return self.clock()

    def on_start(self) -> None:
        assert self.consumer is not None
        self.consumer.unsubscribe()
        self.consumer.subscribe(list(self.input_topics), listener=_Rebuild(self))

    def _maybe_new_head(self) -> None:
        """Switch to a newly learned head (same input sizes) before the next batch is used."""
        head = self.head_watch.check()
        if (
            head is not None
            and dict(head.head.dims) == dict(self.model.head.dims)
            and head.encoders == self.model.encoders
        ):
            log.info("fusion head %s -> %s", self.model.version, head.version)
            self.model = head

    def _poll_batch(self) -> list[ConsumerRecord]:
        batch = super()._poll_batch()
        self._maybe_new_head()
        # The listener runs inside kafka-python's poll, where blocking calls are forbidden:
        # it only notes the assignment, and the rebuild happens here, before the batch is used.
        if self._assigned is not None:
            assigned, self._assigned = self._assigned, None
            from services.fusion_state import rebuild

            rebuild(self, assigned)
            held = set(assigned)
            # Records polled before the rebalance may belong to partitions we lost.
            batch = [r for r in batch if TopicPartition(r.topic, r.partition) in held]
        return batch

    def set_assignment(self, partitions: list[TopicPartition], n_partitions: int) -> None:
        """Which partitions of ``city.embeddings`` this member holds (decides ownership)."""
        self.owned = {tp.partition for tp in partitions if tp.topic == topics.EMBEDDINGS}
        self._n_partitions = max(n_partitions, 1)


class _Rebuild(ConsumerRebalanceListener):
    def __init__(self, svc: FusionService) -> None:
        self.svc = svc

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Nothing is emitted for partitions that are going away: the next assignment rebuilds.
        self.svc.owned = set()

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.svc._assigned = list(assigned)
