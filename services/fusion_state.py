"""Rebuilding fusion state on a partition assignment, at a cost bounded by the live incidents.

Incidents live ``ttl_s`` after their last evidence, so the state of the assigned partitions is
exactly what ``city.embeddings`` received since ``now - ttl_s`` (record timestamps), up to the
committed offsets. The alerts already published (``city.alerts`` over the same window) give each
rebuilt incident its alert id, version and superseded ids, so nothing is emitted twice.

Tansu answers ``offsets_for_times`` with offset 0 for most timestamps (tested: a 10-record
partition with one record every 10 s answered 0 for "55 s ago" instead of 5; STACK-NOTES §6 lists
its other broken offset calls). Its answer is therefore only a hint: it is checked against the
record before it, and when wrong the first offset at or after the time is found by a binary
search over offsets (a few single-record fetches per partition).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from streams import topics
from streams.clients import KafkaSettings, make_consumer
from streams.errors import RejectedInput
from streams.schemas import Alert, Embedding
from streams.serde import from_bytes

if TYPE_CHECKING:
    from services.fusion import FusionService

log = logging.getLogger(__name__)

# Producer clocks and batching make record timestamps only roughly ordered within a partition.
SLACK_MS = 60_000
# Small fetches while probing offsets: a probe needs one record, not 16 MB of embeddings.
PROBE_FETCH_BYTES = 65_536


def _first(consumer: KafkaConsumer, tp: TopicPartition, offset: int) -> ConsumerRecord | None:
    """The first record of ``tp`` at or after ``offset`` (None past the end)."""
    consumer.seek(tp, offset)
    for _ in range(8):
        for rec in consumer.poll(timeout_ms=250, max_records=1).get(tp, []):
            return rec
    return None


def high_watermark(consumer: KafkaConsumer, tp: TopicPartition) -> int:
    """The partition's end offset, read from a fetch response (Tansu's ListOffsets LATEST is
    wrong, STACK-NOTES §6)."""
    consumer.assign([tp])
    _first(consumer, tp, 0)
    return consumer.highwater(tp) or 0


def offset_at(consumer: KafkaConsumer, tp: TopicPartition, ts_ms: int, end: int) -> int:
    """The first offset below ``end`` whose record timestamp is >= ``ts_ms`` (``end`` if none)."""
    if end <= 0:
        return 0
    consumer.assign([tp])
    hint = consumer.offsets_for_times({tp: ts_ms}).get(tp)
    if hint is not None and 0 < hint.offset < end:
        before = _first(consumer, tp, hint.offset - 1)
        if before is not None and before.offset == hint.offset - 1 and before.timestamp < ts_ms:
            return int(hint.offset)
    lo, hi = 0, end  # invariant: records before lo are older than ts_ms; answer in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        rec = _first(consumer, tp, mid)
        if rec is None or rec.offset >= hi or rec.timestamp >= ts_ms:
            hi = mid  # reading from mid starts at rec: mid is as good an answer as rec.offset
        else:
            lo = rec.offset + 1
    return lo


def read_range(
    settings: KafkaSettings, ranges: dict[TopicPartition, tuple[int, int]]
) -> Iterator[ConsumerRecord]:
    """Records of each partition in ``[start, stop)``."""
    todo = {tp: r for tp, r in ranges.items() if r[0] < r[1]}
    if not todo:
        return
    consumer = make_consumer(settings, None, enable_auto_commit=False)
    try:
        consumer.assign(list(todo))
        for tp, (start, _) in todo.items():
            consumer.seek(tp, start)
        idle = 0
        while todo and idle < 20:
            got = consumer.poll(timeout_ms=250)
            idle = 0 if got else idle + 1
            for tp, recs in got.items():
                if tp not in todo:
                    continue
                stop = todo[tp][1]
                for rec in recs:
                    if rec.offset < stop:
                        yield rec
                if consumer.position(tp) >= stop:
                    del todo[tp]
    finally:
        consumer.close()


def _window(
    settings: KafkaSettings, ends: dict[TopicPartition, int], since_ms: int
) -> dict[TopicPartition, tuple[int, int]]:
    probe = make_consumer(
        settings, None, enable_auto_commit=False, max_partition_fetch_bytes=PROBE_FETCH_BYTES
    )
    try:
        return {tp: (offset_at(probe, tp, since_ms, end), end) for tp, end in ends.items()}
    finally:
        probe.close()


def rebuild(svc: FusionService, partitions: list[TopicPartition]) -> None:
    """Replace ``svc``'s state by the incidents of ``partitions``: their embeddings of the last
    ``ttl_s`` up to the committed offsets, with alert ids and versions from ``city.alerts``."""
    assert svc.consumer is not None
    t0 = time.monotonic()
    n_partitions = len(svc.consumer.partitions_for_topic(topics.EMBEDDINGS) or partitions)
    svc.reset()
    svc.set_assignment(partitions, n_partitions)
    since_ms = int(time.time() * 1000 - svc.ttl_s * 1000) - SLACK_MS
    committed = {tp: svc.consumer.committed(tp) or 0 for tp in partitions}
    ranges = _window(svc.settings, {tp: off for tp, off in committed.items() if off > 0}, since_ms)
    n = 0
    for rec in read_range(svc.settings, ranges):
        try:
            svc.add(from_bytes(Embedding, rec.value or b""), rec.timestamp)
            n += 1
        except (RejectedInput, ValueError):
            continue  # rejected when first seen: its dead letter already exists
    svc.dirty.clear()
    if svc.incidents:
        adopt(svc, published(svc.settings, since_ms))
    log.info(
        "fusion rebuilt %d incidents from %d embeddings of %d partitions in %.1fs",
        len(svc.incidents),
        n,
        len(partitions),
        time.monotonic() - t0,
    )


def published(settings: KafkaSettings, since_ms: int) -> dict[str, Alert]:
    """The newest version of every alert published since ``since_ms``."""
    probe = make_consumer(
        settings, None, enable_auto_commit=False, max_partition_fetch_bytes=PROBE_FETCH_BYTES
    )
    try:
        tps = [
            TopicPartition(topics.ALERTS, p)
            for p in probe.partitions_for_topic(topics.ALERTS) or []
        ]
        ends = {tp: high_watermark(probe, tp) for tp in tps}
    finally:
        probe.close()
    last: dict[str, Alert] = {}
    for rec in read_range(settings, _window(settings, ends, since_ms)):
        try:
            a = from_bytes(Alert, rec.value or b"")
        except RejectedInput:
            continue
        if a.alert_id not in last or a.version > last[a.alert_id].version:
            last[a.alert_id] = a
    return last


def adopt(svc: FusionService, alerts: dict[str, Alert]) -> None:
    """Give each rebuilt incident the alert already published for its evidence (the one no
    other candidate supersedes, then the largest overlap)."""
    by_event: dict[str, set[str]] = {}
    for a in alerts.values():
        for eid in a.evidence:
            by_event.setdefault(eid, set()).add(a.alert_id)
    for inc in svc.incidents.values():
        overlap: dict[str, int] = {}
        for eid in inc.seen:
            for aid in by_event.get(eid, ()):
                overlap[aid] = overlap.get(aid, 0) + 1
        if not overlap:
            continue
        superseded = {s for aid in overlap for s in alerts[aid].supersedes or []}
        live = [aid for aid in overlap if aid not in superseded] or list(overlap)
        best = alerts[max(live, key=lambda aid: (overlap[aid], aid))]
        inc.alert_id = best.alert_id
        inc.emitted_version = best.version
        inc.emitted_sig = (best.evidence_count or len(best.evidence), frozenset(best.evidence))
        inc.superseded = list(best.supersedes or [])
