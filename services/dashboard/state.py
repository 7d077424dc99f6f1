"""What the dashboard knows: alerts by id (every version), a bounded evidence cache, feedback,
dead letters and throughput. Filled by the topic reader thread, read by the web app.

Every bound comes from ``configs/services.json`` ("dashboard"): the process never grows
with the length of the topics it reads.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from streams import topics
from streams.schemas import Alert, Feedback, parse_ts
from streams.settings import Dashboard, defaults

TOPIC_MODALITY = {topics.TEXT: "text", topics.FRAMES: "image", topics.CALLS: "audio"}


@dataclass
class EvidenceItem:
    """One input event as the incident page shows it (media kept as bytes, served separately)."""

    event_id: str
    topic: str
    modality: str
    ts: str
    source: str
    area: str | None
    location: dict[str, float] | None
    text: str | None = None
    lang: str | None = None
    media: bytes | None = None
    content_type: str | None = None
    transcript: str | None = None
    name: str | None = None  # camera_id or call_id

    @property
    def size(self) -> int:
        """Bytes this entry holds (what the cache bound counts)."""
        return len(self.media or b"") + len(self.text or "") + len(self.transcript or "") + 256

    def public(self, with_media_url: bool = True) -> dict[str, Any]:
        """JSON for the browser (no raw bytes)."""
        return {
            "event_id": self.event_id,
            "topic": self.topic,
            "modality": self.modality,
            "ts": self.ts,
            "source": self.source,
            "area": self.area,
            "location": self.location,
            "text": self.text,
            "lang": self.lang,
            "transcript": self.transcript,
            "name": self.name,
            "content_type": self.content_type,
            "has_media": self.media is not None and with_media_url,
        }


class EvidenceCache:
    """LRU of input events by event_id, bounded by count and by bytes."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.items: OrderedDict[str, EvidenceItem] = OrderedDict()
        self.bytes = 0
        self.evicted = 0
        # Transcripts may arrive (on city.embeddings) before or after their call.
        self._transcripts: OrderedDict[str, str] = OrderedDict()

    def put(self, item: EvidenceItem) -> None:
        """Insert or replace an event, then evict the least recently used past the bounds."""
        old = self.items.pop(item.event_id, None)
        if old is not None:
            self.bytes -= old.size
        if item.transcript is None:
            item.transcript = self._transcripts.pop(item.event_id, None)
        if item.size > self.max_bytes:
            return  # larger than the whole cache: never kept
        self.items[item.event_id] = item
        self.bytes += item.size
        self._evict()

    def set_transcript(self, event_id: str, transcript: str) -> None:
        """Attach a call's transcript (kept aside, bounded, if the call is not cached yet)."""
        item = self.items.get(event_id)
        if item is None:
            self._transcripts[event_id] = transcript
            while len(self._transcripts) > self.max_items:
                self._transcripts.popitem(last=False)
            return
        self.bytes -= item.size
        item.transcript = transcript
        self.bytes += item.size
        self._evict()

    def get(self, event_id: str) -> EvidenceItem | None:
        """The event, marked as recently used."""
        item = self.items.get(event_id)
        if item is not None:
            self.items.move_to_end(event_id)
        return item

    def _evict(self) -> None:
        while self.items and (len(self.items) > self.max_items or self.bytes > self.max_bytes):
            _, gone = self.items.popitem(last=False)
            self.bytes -= gone.size
            self.evicted += 1


def _media_bytes(media: Any) -> tuple[bytes | None, str | None]:
    """Inline media only: claim-check URIs are never fetched by the dashboard."""
    if not isinstance(media, dict):
        return None, None
    ctype = media.get("content_type")
    data = media.get("data_b64")
    if not isinstance(data, str) or not isinstance(ctype, str):
        return None, None
    try:
        return base64.b64decode(data, validate=True), ctype
    except (binascii.Error, ValueError):
        return None, None


def evidence_from_input(topic: str, raw: bytes) -> EvidenceItem | None:
    """An input topic record as cache entry; None when it is not a readable event.

    The dashboard only displays: validation of inputs is the encoders' job (bad ones are in
    the DLQ), so a partial record is shown with what it has, never trusted as HTML."""
    try:
        msg = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(msg, dict) or not isinstance(msg.get("event_id"), str):
        return None
    loc = msg.get("location")
    location = None
    if isinstance(loc, dict):
        try:
            location = {"lat": float(loc["lat"]), "lon": float(loc["lon"])}
        except (KeyError, TypeError, ValueError):
            location = None
    media, ctype = _media_bytes(msg.get("media"))
    name = msg.get("camera_id") or msg.get("call_id")
    text = msg.get("text")
    return EvidenceItem(
        event_id=msg["event_id"][:200],
        topic=topic,
        modality=TOPIC_MODALITY[topic],
        ts=str(msg.get("ts", "")),
        source=str(msg.get("source", "unknown")),
        area=str(msg["area"]) if msg.get("area") is not None else None,
        location=location,
        text=str(text)[:10_000] if text is not None else None,
        lang=str(msg["lang"]) if msg.get("lang") else None,
        media=media,
        content_type=ctype,
        name=str(name) if name is not None else None,
    )


@dataclass
class AlertEntry:
    """Every version of one alert, newest last, plus the operators' feedback on it."""

    versions: list[Alert] = field(default_factory=list)
    feedback: list[Feedback] = field(default_factory=list)

    @property
    def latest(self) -> Alert:
        return self.versions[-1]

    def add(self, a: Alert) -> bool:
        """Keep versions sorted and unique; True when ``a`` is new."""
        if any(v.version == a.version for v in self.versions):
            return False
        self.versions.append(a)
        self.versions.sort(key=lambda v: v.version)
        return True


def alert_row(entry: AlertEntry) -> dict[str, Any]:
    """The list/map view of an alert: its latest version and the last verdict on it."""
    a = entry.latest
    row = a.model_dump(mode="json", exclude={"probs", "evidence"})
    row["n_versions"] = len(entry.versions)
    row["n_evidence"] = len(a.evidence)
    row["verdict"] = entry.feedback[-1].action if entry.feedback else None
    row["verdict_label"] = entry.feedback[-1].label if entry.feedback else None
    return row


class Subscriber:
    """One browser's event stream: an asyncio queue fed from the reader thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, maxsize: int) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[str] = asyncio.Queue(maxsize)
        self.overflowed = False

    def push(self, message: str) -> None:
        def put() -> None:
            try:
                self.queue.put_nowait(message)
            except asyncio.QueueFull:
                # A stalled browser is cut off rather than let memory grow; it reconnects
                # and reloads the list.
                self.overflowed = True

        self.loop.call_soon_threadsafe(put)


class DashboardState:
    """Thread-safe store shared by the reader thread and the web app."""

    def __init__(self, bounds: Dashboard | None = None) -> None:
        self.bounds = bounds or defaults().dashboard
        self.lock = threading.Lock()
        self.alerts: OrderedDict[str, AlertEntry] = OrderedDict()
        self.evidence = EvidenceCache(self.bounds.cache_events, self.bounds.cache_bytes)
        self.dlq: Counter[str] = Counter()
        self.dlq_by_stage: Counter[str] = Counter()
        self.feedback_count = 0
        self.records: Counter[str] = Counter()
        self.highwater: dict[tuple[str, int], int] = {}
        self._recent: dict[str, deque[float]] = {}
        self._subs: set[Subscriber] = set()
        self.started = time.time()

    # -- writes (reader thread) ----------------------------------------------------------
    def count(self, topic: str, ts_ms: int) -> None:
        """Count one record for throughput (by broker timestamp, within the window)."""
        self.records[topic] += 1
        window = self._recent.setdefault(topic, deque())
        window.append(ts_ms / 1000)
        self._trim(window)

    def _trim(self, window: deque[float]) -> None:
        horizon = time.time() - self.bounds.throughput_window_s
        while window and window[0] < horizon:
            window.popleft()

    def add_alert(self, a: Alert) -> None:
        """Store a version; tell the browsers when it is new."""
        with self.lock:
            entry = self.alerts.get(a.alert_id)
            if entry is None:
                entry = self.alerts[a.alert_id] = AlertEntry()
            if not entry.add(a):
                return
            self.alerts.move_to_end(a.alert_id)
            while len(self.alerts) > self.bounds.max_alerts:
                self.alerts.popitem(last=False)
            row = alert_row(entry)
        self.publish("alert", row)

    def add_feedback(self, fb: Feedback) -> None:
        """Attach an operator's verdict (read back from ``city.feedback``)."""
        with self.lock:
            self.feedback_count += 1
            entry = self.alerts.get(fb.alert_id)
            if entry is None:
                return
            entry.feedback.append(fb)
            row = alert_row(entry)
        self.publish("alert", row)

    def add_evidence(self, item: EvidenceItem) -> None:
        """Cache an input event."""
        with self.lock:
            self.evidence.put(item)

    def add_transcript(self, event_id: str, transcript: str) -> None:
        """Attach a call's transcript from its embedding."""
        with self.lock:
            self.evidence.set_transcript(event_id, transcript[:5000])

    def add_dead_letter(self, stage: str, reason: str) -> None:
        """Count a DLQ record."""
        with self.lock:
            self.dlq[reason] += 1
            self.dlq_by_stage[stage] += 1

    # -- reads (web app) -----------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """Every alert's latest version, newest first."""
        with self.lock:
            rows = [alert_row(e) for e in self.alerts.values()]
        return sorted(rows, key=lambda r: parse_ts(r["emitted_ts"]), reverse=True)

    def incident(self, alert_id: str) -> dict[str, Any] | None:
        """Every version, the feedback and the evidence of one alert."""
        with self.lock:
            entry = self.alerts.get(alert_id)
            if entry is None:
                return None
            ids: list[str] = []
            for v in entry.versions:
                ids.extend(e for e in v.evidence if e not in ids)
            evidence = []
            for eid in ids:
                item = self.evidence.get(eid)
                evidence.append(item.public() if item else {"event_id": eid, "missing": True})
            return {
                "alert_id": alert_id,
                "versions": [v.model_dump(mode="json") for v in entry.versions],
                "feedback": [f.model_dump(mode="json") for f in entry.feedback],
                "evidence": evidence,
            }

    def version_exists(self, alert_id: str, version: int) -> bool:
        """Whether the dashboard has seen this version of this alert."""
        with self.lock:
            entry = self.alerts.get(alert_id)
            return entry is not None and any(v.version == version for v in entry.versions)

    def media(self, event_id: str) -> tuple[bytes, str] | None:
        """The cached media of an event and its content type."""
        with self.lock:
            item = self.evidence.get(event_id)
            if item is None or item.media is None or item.content_type is None:
                return None
            return item.media, item.content_type

    def throughput(self) -> dict[str, float]:
        """Records per second per topic over the window."""
        with self.lock:
            out = {}
            for topic, window in self._recent.items():
                self._trim(window)
                out[topic] = round(len(window) / self.bounds.throughput_window_s, 3)
            return out

    def stats(self) -> dict[str, Any]:
        """Counters for the health panel."""
        with self.lock:
            return {
                "records": dict(self.records),
                "dlq": {
                    "count": sum(self.dlq.values()),
                    "by_reason": dict(self.dlq),
                    "by_stage": dict(self.dlq_by_stage),
                },
                "feedback": self.feedback_count,
                "alerts": len(self.alerts),
                "cache": {
                    "events": len(self.evidence.items),
                    "bytes": self.evidence.bytes,
                    "evicted": self.evidence.evicted,
                    "max_events": self.evidence.max_items,
                    "max_bytes": self.evidence.max_bytes,
                },
            }

    # -- browsers ------------------------------------------------------------------------
    def subscribe(self, loop: asyncio.AbstractEventLoop) -> Subscriber:
        """A new event stream."""
        sub = Subscriber(loop, self.bounds.sse_queue)
        with self.lock:
            self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        """Forget a closed stream."""
        with self.lock:
            self._subs.discard(sub)

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        """Send one server-sent event to every open stream."""
        message = f"event: {kind}\ndata: {json.dumps(data)}\n\n"
        with self.lock:
            subs = list(self._subs)
        for sub in subs:
            try:
                sub.push(message)
            except RuntimeError:  # its event loop is closed
                self.unsubscribe(sub)
