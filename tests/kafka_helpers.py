"""Small helpers for tests that talk to the real broker."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer

from streams.clients import KafkaSettings, assign_all, make_consumer, make_producer
from streams.schemas import utc_now


def send(
    settings: KafkaSettings, topic: str, value: dict[str, Any] | bytes, key: str | None = None
) -> None:
    """Produce one record and wait for the broker's ack."""
    p = make_producer(settings)
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    p.send(topic, key=key.encode() if key else None, value=raw).get(timeout=10)
    p.close()


def reader(settings: KafkaSettings, topic: str) -> KafkaConsumer:
    """A group-less consumer at the start of every partition of ``topic``."""
    c = make_consumer(settings, None)
    assign_all(c, topic)
    c.seek_to_beginning()
    return c


def wait_for(
    consumer: KafkaConsumer, pred: Callable[[dict[str, Any]], bool], timeout: float = 90
) -> list[dict[str, Any]]:
    """Poll until some record's JSON value satisfies ``pred``; returns all matching values seen."""
    deadline = time.monotonic() + timeout
    seen: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        for recs in consumer.poll(timeout_ms=200).values():
            for r in recs:
                try:
                    v = json.loads(r.value)
                except ValueError:
                    continue
                if pred(v):
                    seen.append(v)
        if seen:
            # Let later versions of the same thing arrive too.
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                for recs in consumer.poll(timeout_ms=200).values():
                    seen.extend(v for r in recs if pred(v := json.loads(r.value)))
            return seen
    return seen


def event(**fields: Any) -> dict[str, Any]:
    """A valid input envelope with a fresh event_id."""
    return {
        "schema_version": 1,
        "event_id": f"t-{uuid.uuid4().hex[:12]}",
        "ts": utc_now(),
        "source": "test",
        **fields,
    }


def media(path: Path, content_type: str) -> dict[str, str]:
    """Inline media of a file."""
    return {"content_type": content_type, "data_b64": base64.b64encode(path.read_bytes()).decode()}
