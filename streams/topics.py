"""Every topic name and its creation settings: the one place the rest of the code looks them up."""

from __future__ import annotations

from dataclasses import dataclass

TEXT = "city.reports.text"
FRAMES = "city.frames"
CALLS = "city.calls.audio"
EMBEDDINGS = "city.embeddings"
ALERTS = "city.alerts"
FEEDBACK = "city.feedback"
DLQ = "city.dlq"

INPUT_TOPICS = (TEXT, FRAMES, CALLS)


@dataclass(frozen=True)
class TopicSpec:
    """How a topic is created when the pipeline sets up a cluster."""

    name: str
    partitions: int = 3
    # Memory storage in the embedded broker keeps everything; bound long runs.
    retention_ms: int = 7 * 24 * 3600 * 1000


ALL_TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(TEXT),
    TopicSpec(FRAMES, retention_ms=24 * 3600 * 1000),
    TopicSpec(CALLS, retention_ms=24 * 3600 * 1000),
    TopicSpec(EMBEDDINGS),
    TopicSpec(ALERTS),
    TopicSpec(FEEDBACK),
    TopicSpec(DLQ),
)
