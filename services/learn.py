"""``cityfuse learn``: operator feedback from ``city.feedback`` -> a new fusion head version.

For each alert the last verdict wins (an operator may confirm, then relabel). The verdict
names an alert version; that version's evidence ids are looked up on ``city.embeddings``,
so the head learns from exactly the vectors it labelled. The update itself, the artifact
and the pointer the fusion service watches are in :mod:`models.continual`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kafka.consumer.fetcher import ConsumerRecord

from models.continual import (
    Example,
    LearnConfig,
    example_from_evidence,
    fits,
    load_current,
    model_dir,
    update_head,
    write_learned,
)
from models.fusion import Evidence, FusionModel
from streams import topics
from streams.clients import KafkaSettings, assign_all, make_consumer
from streams.console import console
from streams.errors import RejectedInput
from streams.schemas import Alert, Embedding, Feedback
from streams.serde import from_bytes
from streams.taxonomy import label_index

if TYPE_CHECKING:
    from models.train import Pool


@dataclass
class FeedbackSet:
    """What the topics hold for learning, and what could not be used (with why)."""

    examples: list[Example] = field(default_factory=list)
    feedback: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1


def read_topic(
    settings: KafkaSettings, topic: str, idle_polls: int = 4
) -> Iterable[ConsumerRecord]:
    """Every record of a topic, read until polls come back empty (Tansu's LATEST offsets are
    wrong, STACK-NOTES §6, so the end is found by reading)."""
    consumer = make_consumer(settings, None)
    try:
        assign_all(consumer, topic)
        consumer.seek_to_beginning()
        idle = 0
        while idle < idle_polls:
            got = consumer.poll(timeout_ms=300)
            idle = 0 if got else idle + 1
            for recs in got.values():
                yield from recs
    finally:
        consumer.close()


def collect(settings: KafkaSettings) -> FeedbackSet:
    """Examples from every verdict whose alert version and evidence vectors can be found."""
    out = FeedbackSet()
    last: dict[str, Feedback] = {}
    for rec in read_topic(settings, topics.FEEDBACK):
        try:
            fb = from_bytes(Feedback, rec.value or b"")
        except RejectedInput:
            out.skip("feedback_invalid")
            continue
        out.feedback += 1
        last[fb.alert_id] = fb  # topic order per key: the last verdict wins
    if not last:
        return out
    wanted = {(fb.alert_id, fb.version) for fb in last.values()}
    alerts: dict[tuple[str, int], Alert] = {}
    for rec in read_topic(settings, topics.ALERTS):
        try:
            a = from_bytes(Alert, rec.value or b"")
        except RejectedInput:
            continue
        if (a.alert_id, a.version) in wanted:
            alerts[(a.alert_id, a.version)] = a
    needed = {e for a in alerts.values() for e in a.evidence}
    vectors: dict[str, Evidence] = {}
    for rec in read_topic(settings, topics.EMBEDDINGS):
        try:
            emb = from_bytes(Embedding, rec.value or b"")
        except RejectedInput:
            continue
        if emb.event_id in needed:
            try:
                vectors[emb.event_id] = Evidence(emb.modality, emb.array(), emb.text_array())
            except ValueError:
                continue
    for fb in last.values():
        alert = alerts.get((fb.alert_id, fb.version))
        if alert is None:
            out.skip("alert_version_not_found")
            continue
        evidence = [vectors[e] for e in alert.evidence if e in vectors]
        if not evidence:
            out.skip("evidence_not_found")
            continue
        out.examples.append(
            example_from_evidence(evidence, label_index(fb.label), f"{fb.alert_id}@v{fb.version}")
        )
    return out


def rehearsal_pools(text_cap: int | None = None, audio: bool = True) -> dict[str, Pool]:
    """The training split's cached embeddings (models/train.py), replayed while learning;
    ``text_cap`` as ``cityfuse train --text-cap`` (the same cache)."""
    from models.train import load_pools

    pools, _ = load_pools(with_audio=audio, text_cap=text_cap)
    return pools["train"]


def learn(
    settings: KafkaSettings,
    out: Path | None = None,
    cfg: LearnConfig | None = None,
    rehearsal: dict[str, Pool] | None = None,
    text_cap: int | None = None,
    audio: bool = True,
) -> dict[str, Any]:
    """Read feedback, update the head in service, write and point to the new version."""
    from rich.table import Table

    cfg = cfg or LearnConfig()
    folder = model_dir(out)
    found = collect(settings)
    if not found.examples:
        raise ValueError(
            f"no usable feedback on {topics.FEEDBACK} "
            f"({found.feedback} records; skipped {found.skipped or 'none'})"
        )
    previous: FusionModel = load_current(folder)
    usable = [e for e in found.examples if fits(e, dict(previous.head.dims))]
    if len(usable) < len(found.examples):
        found.skipped["vector_size_mismatch"] = len(found.examples) - len(usable)
        found.examples = usable
    if not found.examples:
        raise ValueError(f"no feedback incident has vectors this head reads ({found.skipped})")
    pools = rehearsal if rehearsal is not None else rehearsal_pools(text_cap, audio)
    update: dict[str, Any] = {}
    head = update_head(previous.head, found.examples, pools, cfg, info=update)
    info = {
        "feedback_records": found.feedback,
        "examples": len(found.examples),
        "skipped": found.skipped,
        "update": update,
    }
    model = write_learned(head, previous, folder, info, cfg)
    t = Table(title="cityfuse learn", show_header=False)
    t.add_row("feedback records", str(found.feedback))
    t.add_row("incidents learned from", str(len(found.examples)))
    t.add_row("skipped", str(found.skipped or "none"))
    t.add_row(
        "update steps",
        f"{update['steps_run']}" + (" (early stop)" if update["early_stopped"] else ""),
    )
    t.add_row("previous head", previous.version)
    t.add_row("new head", model.version)
    t.add_row("written to", str(folder / model.version))
    console.print(t)
    return {**info, "previous": previous.version, "version": model.version, "folder": str(folder)}
