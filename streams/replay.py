"""Replay a recording into the input topics at ``t / speed``, media inlined."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from streams.clients import KafkaSettings, make_producer
from streams.console import progress
from streams.recording import inline_media, read_recording, record_key


@dataclass
class ReplayStats:
    """What a replay sent."""

    sent: int = 0
    by_topic: dict[str, int] = field(default_factory=dict)
    started: float = 0.0
    seconds: float = 0.0


def replay(
    settings: KafkaSettings, folder: Path, speed: float = 1.0, show_progress: bool = True
) -> ReplayStats:
    """Send every event of the recording; ``speed <= 0`` sends as fast as possible."""
    _, events = read_recording(folder)
    producer = make_producer(settings)
    stats = ReplayStats(started=time.time())
    t0 = time.monotonic()
    try:
        with progress() as bar:
            task = bar.add_task(f"replay {folder.name}", total=len(events), visible=show_progress)
            for ev in events:
                if speed > 0:
                    delay = ev.t / speed - (time.monotonic() - t0)
                    if delay > 0:
                        producer.flush()
                        time.sleep(delay)
                msg = inline_media(ev.message, folder)
                key = record_key(ev.topic, msg)
                producer.send(
                    ev.topic,
                    key=key.encode() if key else None,
                    value=json.dumps(msg, separators=(",", ":")).encode("utf-8"),
                )
                stats.sent += 1
                stats.by_topic[ev.topic] = stats.by_topic.get(ev.topic, 0) + 1
                bar.advance(task)
            producer.flush()
    finally:
        producer.close()
    stats.seconds = time.monotonic() - t0
    return stats
