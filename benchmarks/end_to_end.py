"""End to end through the embedded broker and the real services: capacity, then latency and
throughput at several offered loads of a mixed stream of reports, frames and calls.

An event is done when the first alert naming it in its evidence is published; its latency
is that alert's ``emitted_ts`` minus the moment the event was sent. Fusion's hold for
unconfident incidents (``pending_s``, a product policy: wait up to 3 s for more evidence)
is set to 0 here, so the figures are processing and queueing time, not a deliberate wait.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.samples import Sample
from services.runtime import Collector, Models, Pipeline
from streams import topics
from streams.clients import KafkaSettings, make_producer
from streams.recording import record_key
from streams.schemas import Alert, parse_ts
from streams.serde import from_bytes

# One cycle of the mixed stream: reports and frames are common, calls rarer (5:4:1).
CYCLE = (
    topics.TEXT, topics.FRAMES, topics.TEXT, topics.FRAMES, topics.CALLS,
    topics.TEXT, topics.FRAMES, topics.TEXT, topics.FRAMES, topics.TEXT,
)  # fmt: skip
MIX = {t: CYCLE.count(t) / len(CYCLE) for t in topics.INPUT_TOPICS}
EVENTS_PER_INCIDENT = 3
FUSION_KW = {"pending_s": 0.0}


def mixed(pools: dict[str, list[Sample]]) -> Iterator[Sample]:
    """An endless, deterministic stream of the pools' samples in the order of ``CYCLE``."""
    cycles = {t: itertools.cycle(pools[t]) for t in set(CYCLE)}
    for t in itertools.cycle(CYCLE):
        yield next(cycles[t])


@dataclass
class Round:
    """One offered load and what came out."""

    offered_per_s: float | None  # None: a burst, everything sent at once
    sent: int
    done: int
    seconds: float
    latencies_ms: list[float]
    # Per done event: (input topic, ms from send to its embedding, ms from there to its alert).
    stages: list[tuple[str, float, float]] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Events done per second, first send to last completion."""
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """JSON view."""
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return {
            "offered_events_per_s": self.offered_per_s,
            "sent": self.sent,
            "done": self.done,
            "seconds": self.seconds,
            "throughput_events_per_s": self.throughput,
            "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)),
            "slowest": self.slowest(),
        }

    def slowest(self, share: float = 0.01) -> dict[str, Any]:
        """Where the slowest ``share`` of events spent their time (at least 3 events): the
        encoder stage (send to embedding produced: queue, batch wait, decode, forward) against
        fusion (embedding to alert), and which inputs they were. Tells a stalled stage from
        a slow one."""
        if not self.stages:
            return {}
        order = np.argsort([enc + fuse for _, enc, fuse in self.stages])[::-1]
        top = [self.stages[i] for i in order[: max(3, int(len(order) * share))]]
        return {
            "n": len(top),
            "encode_ms": [round(e, 1) for _, e, _ in top],
            "fuse_ms": [round(f, 1) for _, _, f in top],
            "topics": {t: sum(1 for s in top if s[0] == t) for t in {s[0] for s in top}},
        }


class Bench:
    """A running pipeline plus a producer and an alert collector, for several rounds."""

    def __init__(self, live: KafkaSettings, models: Models, pools: dict[str, list[Sample]]) -> None:
        self.live = live
        self.stream = mixed(pools)
        self.collector = Collector(live, topics.ALERTS, topics.EMBEDDINGS).start()
        self.pipeline = Pipeline(live, models, None, dict(FUSION_KW)).start()
        self.producer = make_producer(live)
        self.seen = self.seen_emb = 0
        self.done_at: dict[str, float] = {}
        self.embedded_at: dict[str, float] = {}
        self.rounds = 0

    def close(self) -> None:
        """Stop the services, the producer and the collector."""
        self.producer.close()
        self.pipeline.close()
        self.collector.close()

    def _collect(self) -> None:
        embs = self.collector.snapshot(topics.EMBEDDINGS)[self.seen_emb :]
        self.seen_emb += len(embs)
        for r in embs:  # the record's create time: when the encoder service produced it
            self.embedded_at[json.loads(r.value)["event_id"]] = r.timestamp / 1000
        recs = self.collector.snapshot(topics.ALERTS)[self.seen :]
        self.seen += len(recs)
        for r in recs:
            a = from_bytes(Alert, r.value)
            t = parse_ts(a.emitted_ts).timestamp()
            for eid in a.evidence:
                if eid not in self.done_at or t < self.done_at[eid]:
                    self.done_at[eid] = t

    def round(self, n: int, rate: float | None, timeout_s: float, tick: Any = None) -> Round:
        """Send ``n`` events at ``rate`` per second (None: all at once), wait for their alerts."""
        self.rounds += 1
        prefix = f"r{self.rounds}"
        sent_at: dict[str, float] = {}
        topic_of: dict[str, str] = {}
        t0 = time.time()
        for i in range(n):
            if rate:
                time.sleep(max(0.0, t0 + i / rate - time.time()))
            s = next(self.stream)
            eid = f"{prefix}-{i}"
            msg = s.message(eid, f"{prefix}-inc{i // EVENTS_PER_INCIDENT}")
            key = record_key(s.topic, msg)
            value = json.dumps(msg).encode()
            self.producer.send(s.topic, key=key.encode() if key else None, value=value)
            sent_at[eid] = time.time()
            topic_of[eid] = s.topic
            if rate is None or i % 20 == 0:
                self._collect()
        self.producer.flush()
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            self._collect()
            done = sum(e in self.done_at for e in sent_at)
            if tick is not None:
                tick(done)
            if done == n or self.pipeline.errors:
                break
            time.sleep(0.05)
        if self.pipeline.errors:
            raise RuntimeError("; ".join(self.pipeline.errors))
        finished = {e: self.done_at[e] for e in sent_at if e in self.done_at}
        end = max(finished.values()) if finished else time.time()
        stages = [
            (
                topic_of[e],
                (self.embedded_at[e] - sent_at[e]) * 1000,
                (t - self.embedded_at[e]) * 1000,
            )
            for e, t in finished.items()
            if e in self.embedded_at
        ]
        return Round(
            rate,
            n,
            len(finished),
            end - min(sent_at.values()),
            [(finished[e] - sent_at[e]) * 1000 for e in finished],
            stages,
        )
