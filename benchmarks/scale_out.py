"""Horizontal scaling: 1, then 2 ``cityfuse serve`` processes of one encoder service in one
consumer group, each pinned to one torch thread, on input topics with enough partitions.

Each round starts the instances, waits until the group has settled (every instance holds
partitions and together they hold all of them, read from kafka-python's own assignment log
line), then sends the events spread evenly over the partitions and times them until the
last embedding is out. Model loading and group joins are therefore not in the figure.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kafka.admin import KafkaAdminClient, NewTopic

from benchmarks.samples import Sample
from streams import topics
from streams.broker import EmbeddedBroker
from streams.clients import (
    KafkaSettings,
    assign_all_at_end,
    ensure_topics,
    make_consumer,
    make_producer,
)
from streams.console import console, progress
from streams.schemas import Embedding
from streams.serde import from_bytes

# 4 partitions split evenly over 1 or 2 instances (the default 3 would give 2 + 1).
PARTITIONS = 4
TOPIC = {"text": topics.TEXT, "vision": topics.FRAMES, "speech": topics.CALLS}
RESULT_KEY = {"text": "text", "vision": "image", "speech": "audio"}
_ASSIGNED = re.compile(r"Setting newly assigned partitions (.*) for group")


def _create_topics(live: KafkaSettings) -> None:
    admin = KafkaAdminClient(**live.common())
    try:
        admin.create_topics(
            [NewTopic(t, num_partitions=PARTITIONS, replication_factor=1) for t in TOPIC.values()]
        )
    finally:
        admin.close()
    ensure_topics(live)


class Instances:
    """``k`` serve processes of one service, each with one torch/OpenMP thread."""

    def __init__(self, live: KafkaSettings, service: str, k: int, logdir: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        self.logs = [logdir / f"{service}-{k}-{i}.log" for i in range(k)]
        cmd = [sys.executable, "-m", "services.cli", "-v", "serve", service, "--threads", "1"]
        cmd += ["--bootstrap-servers", str(live.bootstrap_servers)]
        self.procs = [
            subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
            for log in self.logs
        ]

    def held(self) -> list[int]:
        """Partitions each instance holds now (by its latest assignment log line)."""
        out = []
        for log in self.logs:
            lines = _ASSIGNED.findall(log.read_text(errors="replace"))
            out.append(lines[-1].count("partition=") if lines else 0)
        return out

    def wait_settled(self, timeout_s: float) -> None:
        """Until every instance holds partitions and together all of them, stably for 2 s."""
        deadline = time.monotonic() + timeout_s
        stable_since = None
        while time.monotonic() < deadline:
            for p, log in zip(self.procs, self.logs, strict=True):
                if p.poll() is not None:
                    tail = log.read_text(errors="replace")[-800:]
                    raise RuntimeError(f"serve instance exited ({p.returncode}): {tail}")
            held = self.held()
            if all(held) and sum(held) == PARTITIONS:
                stable_since = stable_since or time.monotonic()
                if time.monotonic() - stable_since >= 2.0:
                    return
            else:
                stable_since = None
            time.sleep(0.5)
        tails = " | ".join(log.read_text(errors="replace")[-400:] for log in self.logs)
        raise RuntimeError(f"group did not settle in {timeout_s:.0f} s: {self.held()}: {tails}")

    def stop(self) -> None:
        """SIGTERM (finish the batch, commit), then wait."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _round(
    live: KafkaSettings, service: str, k: int, samples: list[Sample], n: int, logdir: Path, bar: Any
) -> float:
    """Events per second of ``k`` instances on ``n`` events."""
    task = bar.add_task(f"scale-out {service} x{k}: start", total=n)
    inst = Instances(live, service, k, logdir)
    try:
        inst.wait_settled(240.0)
        bar.update(task, description=f"scale-out {service} x{k}")
        prefix = f"so-{service}-{k}"
        consumer = make_consumer(live, None)
        assign_all_at_end(consumer, topics.EMBEDDINGS)
        producer = make_producer(live)
        t0 = time.time()
        for i in range(n):
            s = samples[i % len(samples)]
            producer.send(TOPIC[service], value=s.value(f"{prefix}-{i}"), partition=i % PARTITIONS)
        producer.flush()
        producer.close()
        done: dict[str, float] = {}
        deadline = time.monotonic() + 600
        while len(done) < n and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=500).values():
                for r in recs:
                    emb = from_bytes(Embedding, r.value)
                    if emb.event_id.startswith(prefix + "-"):
                        done[emb.event_id] = r.timestamp / 1000
            bar.update(task, completed=len(done))
        consumer.close()
        if len(done) < n:
            raise RuntimeError(f"scale-out {service} x{k}: {len(done)}/{n} embeddings came back")
        return n / (max(done.values()) - t0)
    finally:
        inst.stop()


def run_scale_out(
    pools: dict[str, list[Sample]],
    services: tuple[str, ...],
    seconds: float,
    result: dict[str, Any],
    repeats: int = 1,
) -> dict[str, Any]:
    """Per service: events/s with 1 and with 2 single-thread instances, and their ratio.

    The number of events is sized from this run's served rate (2 threads) so that one
    instance works about ``seconds``. With ``repeats`` > 1 the 1- and 2-instance rounds
    alternate and the ratio is of the medians: the broker and this process share the two
    cores with the instances, and single rounds of the same setup varied by 0.3x."""
    out: dict[str, Any] = {
        "partitions": PARTITIONS,
        "torch_threads_per_instance": 1,
        "repeats": repeats,
        "services": {},
    }
    with EmbeddedBroker() as broker, progress() as bar, tempfile.TemporaryDirectory() as tmp:
        live = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        _create_topics(live)
        for service in services:
            samples = pools[TOPIC[service]]
            served = result[RESULT_KEY[service]]["served_events_per_s"]
            n = max(8, int(seconds * served / 2))
            n -= n % (2 * PARTITIONS)  # whole rounds over the partitions
            rounds: dict[int, list[float]] = {1: [], 2: []}
            for _ in range(repeats):
                for k in (1, 2):
                    rounds[k].append(_round(live, service, k, samples, n, Path(tmp), bar))
            rate_1, rate_2 = statistics.median(rounds[1]), statistics.median(rounds[2])
            out["services"][service] = {
                "events": n,
                "rate_1": rate_1,
                "rate_2": rate_2,
                "ratio": rate_2 / rate_1,
                "rounds_1": rounds[1],
                "rounds_2": rounds[2],
                "per_core_events_per_s": rate_1,
            }
            console.print(
                f"scale-out {service}: {rate_1:.1f}/s -> {rate_2:.1f}/s ({rate_2 / rate_1:.2f}x, "
                f"median of {repeats})"
            )
    return out
