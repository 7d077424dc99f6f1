"""``cityfuse record``: write live input topics back into the recording format."""

from __future__ import annotations

import json
import time
from pathlib import Path

from streams import topics
from streams.clients import KafkaSettings, assign_all_at_end, make_consumer
from streams.console import progress
from streams.recording import Manifest, RecordingWriter
from streams.taxonomy import label_names


def record(settings: KafkaSettings, folder: Path, duration_s: float, name: str) -> int:
    """Record new messages of the input topics for ``duration_s`` seconds; returns the count."""
    consumer = make_consumer(settings, None)
    assign_all_at_end(consumer, *topics.INPUT_TOPICS)
    writer = RecordingWriter(
        folder, Manifest(name=name, description="recorded live", labels=label_names())
    )
    t0 = time.time()
    try:
        with progress() as bar:
            task = bar.add_task(f"record {duration_s:.0f}s", total=int(duration_s))
            while (elapsed := time.time() - t0) < duration_s:
                for tp, recs in consumer.poll(timeout_ms=200).items():
                    for rec in recs:
                        try:
                            msg = json.loads(rec.value)
                        except ValueError:
                            continue  # not a valid message: nothing to replay
                        if rec.timestamp / 1000 >= t0:  # only what came after the start
                            writer.add(rec.timestamp / 1000 - t0, tp.topic, msg)
                bar.update(task, completed=int(elapsed))
    finally:
        writer.close()
        consumer.close()
    return writer.count
