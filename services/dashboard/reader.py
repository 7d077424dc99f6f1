"""The dashboard's topic reader: one group-less consumer over every pipeline topic, feeding
:class:`DashboardState`, and consumer-group lag from committed offsets.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from services.dashboard.state import TOPIC_MODALITY, DashboardState, evidence_from_input
from streams import topics
from streams.clients import KafkaSettings, assign_all, make_consumer
from streams.errors import RejectedInput
from streams.schemas import Alert, DeadLetter, Feedback
from streams.serde import from_bytes

log = logging.getLogger(__name__)

READ_TOPICS = (
    topics.ALERTS,
    topics.FEEDBACK,
    topics.DLQ,
    topics.EMBEDDINGS,
    *topics.INPUT_TOPICS,
)


class TopicReader:
    """Reads every topic from the beginning (no consumer group: no join delay, no commits)."""

    def __init__(self, settings: KafkaSettings, state: DashboardState) -> None:
        self.settings = settings
        self.state = state
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dashboard-reader", daemon=True)
        self._consumer: KafkaConsumer | None = None

    def start(self) -> TopicReader:
        """Start reading in a background thread."""
        self.thread.start()
        return self

    def close(self) -> None:
        """Stop reading."""
        self.stop.set()
        self.thread.join(10)

    def _run(self) -> None:
        consumer = make_consumer(self.settings, None)
        self._consumer = consumer
        try:
            tps = assign_all(consumer, *READ_TOPICS)
            consumer.seek_to_beginning()
            self.ready.set()
            while not self.stop.is_set():
                for tp, recs in consumer.poll(timeout_ms=200).items():
                    for rec in recs:
                        self.handle(rec)
                    hw = consumer.highwater(tp)
                    if hw is not None:
                        self.state.highwater[(tp.topic, tp.partition)] = hw
                for tp in tps:
                    hw = consumer.highwater(tp)
                    if hw is not None:
                        self.state.highwater[(tp.topic, tp.partition)] = hw
        except Exception:
            log.exception("dashboard reader stopped")
            raise
        finally:
            self.ready.set()
            consumer.close()

    def handle(self, rec: ConsumerRecord) -> None:
        """Route one record to the state; unreadable records are counted and skipped (the
        pipeline's own services send bad input to the DLQ, the dashboard only displays)."""
        topic = rec.topic
        self.state.count(topic, rec.timestamp)
        raw = rec.value or b""
        try:
            if topic == topics.ALERTS:
                self.state.add_alert(from_bytes(Alert, raw))
            elif topic == topics.FEEDBACK:
                self.state.add_feedback(from_bytes(Feedback, raw))
            elif topic == topics.DLQ:
                dl = from_bytes(DeadLetter, raw)
                self.state.add_dead_letter(dl.stage, dl.reason)
            elif topic == topics.EMBEDDINGS:
                self._transcript(raw)
            elif topic in TOPIC_MODALITY:
                item = evidence_from_input(topic, raw)
                if item is not None:
                    self.state.add_evidence(item)
        except RejectedInput as e:
            log.debug("dashboard skipped %s@%s: %s", topic, rec.offset, e)

    def _transcript(self, raw: bytes) -> None:
        # Only two small fields are needed: skip full validation (and vector decoding).
        try:
            msg = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return
        if isinstance(msg, dict) and msg.get("transcript") and isinstance(msg.get("event_id"), str):
            self.state.add_transcript(msg["event_id"], str(msg["transcript"]))


def group_lag(settings: KafkaSettings, highwater: dict[tuple[str, int], int]) -> dict[str, Any]:
    """Lag per consumer group: high watermark (from the reader's fetches) minus committed.

    Never from ListOffsets LATEST, which is wrong on Tansu (STACK-NOTES §6)."""
    admin = KafkaAdminClient(**settings.common())
    try:
        groups = sorted(_group_ids(admin.list_groups()))
        out: dict[str, Any] = {}
        for g in groups:
            offsets = admin.list_group_offsets(g).get(g, {})
            per_topic: dict[str, int] = {}
            for tp, om in offsets.items():
                if not isinstance(tp, TopicPartition) or om is None or om.offset < 0:
                    continue
                hw = highwater.get((tp.topic, tp.partition))
                if hw is None:
                    continue
                per_topic[tp.topic] = per_topic.get(tp.topic, 0) + max(hw - om.offset, 0)
            out[g] = {"lag": sum(per_topic.values()), "by_topic": per_topic}
        return out
    finally:
        admin.close()


def _group_ids(listed: Any) -> list[str]:
    """Group ids from ``list_groups`` (dicts or tuples depending on the client version)."""
    ids = []
    for g in listed:
        if isinstance(g, dict):
            gid = g.get("group_id") or g.get("group")
        elif isinstance(g, (tuple, list)):
            gid = g[0]
        else:
            gid = getattr(g, "group_id", g)
        if isinstance(gid, str):
            ids.append(gid)
    return ids
