"""Scoring a recording: offline (in process, same code as the services) or through Kafka.

Both paths share the event table, the correlation key and the fusion model, so their
numbers are comparable; ``--via-kafka`` adds latency and alerts per incident.
"""

from __future__ import annotations

import base64
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models import metrics
from models.fusion import Evidence, FusionModel
from services import eval_incidents
from services.encoders import EncoderService, SpeechService, TextService, VisionService
from services.eval_ablation import extra_scores
from services.eval_tasks import check_task, score_task
from services.runtime import Collector, Models, Pipeline
from streams import topics
from streams.clients import KafkaSettings, cluster
from streams.console import console, per_class_table, progress
from streams.correlation import Sighting, sighting
from streams.errors import RejectedInput
from streams.recording import inline_media, read_recording
from streams.replay import replay
from streams.schemas import (
    MODALITIES,
    Alert,
    DeadLetter,
    Embedding,
    Modality,
    decode_vector,
    parse_ts,
)
from streams.serde import from_bytes
from streams.taxonomy import label_names

TOPIC_MODALITY: dict[str, Modality] = {
    topics.TEXT: "text",
    topics.FRAMES: "image",
    topics.CALLS: "audio",
}


@dataclass
class Row:
    """One recorded event as scoring sees it."""

    event_id: str
    topic: str
    truth: str | None
    key: str | None = None  # None when the event is rejected
    evidence: Evidence | None = None
    dlq_reason: str | None = None
    truth_incident: str | None = None  # the recording's truth.incident_id
    sighting: Sighting | None = None  # what correlation reads (offline)
    lang: str | None = None  # the message's ``lang`` (text), for ``per_language``


def _group_truth(rows: list[Row]) -> dict[str, str]:
    """Ground-truth label per correlation key (majority of its events' truth labels)."""
    votes: dict[str, Counter[str]] = {}
    for r in rows:
        if r.key is not None and r.truth is not None:
            votes.setdefault(r.key, Counter())[r.truth] += 1
    return {k: c.most_common(1)[0][0] for k, c in votes.items()}


def score(
    rows: list[Row], fusion: FusionModel, incident_pred: dict[str, str] | None = None
) -> dict[str, Any]:
    """The metrics JSON (without latency): per modality, per incident, per class, DLQ."""
    names = label_names()
    per_modality: dict[str, Any] = {}
    for m in MODALITIES:
        scored = [
            r for r in rows if r.evidence is not None and r.truth and r.evidence.modality == m
        ]
        truth = [str(r.truth) for r in scored]
        pred = [fusion.predict([r.evidence]).label for r in scored if r.evidence is not None]
        per_modality[m] = {
            "n": len(scored),
            "accuracy": metrics.accuracy(truth, pred),
            "macro_f1": metrics.macro_f1(truth, pred),
        }
    truth_by_key = _group_truth(rows)
    if incident_pred is None:
        grouped: dict[str, list[Evidence]] = {}
        for r in rows:
            if r.key is not None and r.evidence is not None:
                grouped.setdefault(r.key, []).append(r.evidence)
        incident_pred = {k: fusion.predict(ev).label for k, ev in grouped.items()}
    keys = sorted(truth_by_key)
    y_true = [truth_by_key[k] for k in keys]
    y_pred = [incident_pred.get(k, "missing") for k in keys]
    dlq = Counter(r.dlq_reason for r in rows if r.dlq_reason)
    return {
        "events": len(rows),
        "per_modality": per_modality,
        "incidents": {
            "n": len(keys),
            "accuracy": metrics.accuracy(y_true, y_pred),
            "macro_f1": metrics.macro_f1(y_true, y_pred),
            # Per truth incident (truth.incident_id): split, merged, accuracy.
            **eval_incidents.incident_metrics(rows, incident_pred),
        },
        "per_class": metrics.per_class(y_true, y_pred, names),
        "dlq": {"count": sum(dlq.values()), "by_reason": dict(dlq)},
        "_confusion": (y_true, y_pred),
    } | extra_scores(rows, fusion)


def _services(models: Models) -> dict[str, EncoderService]:
    # Kafka is never touched by decode/embed: the services' own code scores offline.
    none = KafkaSettings()
    return {
        topics.TEXT: TextService(none, models.text),
        topics.FRAMES: VisionService(none, models.vision),
        topics.CALLS: SpeechService(none, models.speech, models.text),
    }


def offline_rows(folder: Path, models: Models) -> list[Row]:
    """Validate, decode and embed every event in process, exactly as the services would."""
    _, events = read_recording(folder)
    services = _services(models)
    rows: list[Row] = []
    pending: dict[str, list[tuple[Row, Any]]] = {t: [] for t in services}
    for ev in events:
        truth = (ev.truth or {}).get("label")
        row = Row(str(ev.message.get("event_id", "?")), ev.topic, truth)
        row.lang = ev.message.get("lang")
        rows.append(row)
        svc = services[ev.topic]
        try:
            raw = json.dumps(inline_media(ev.message, folder)).encode()
            event = from_bytes(svc.schema, raw)
            pending[ev.topic].append((row, svc.decode(event)))
            row.sighting = sighting(
                event.event_id, event.ts, event.location, event.area, event.incident_id
            )
            row.truth_incident = (ev.truth or {}).get("incident_id")
        except RejectedInput as e:
            row.dlq_reason = e.reason
    total = sum(len(v) for v in pending.values())
    with progress() as bar:
        task = bar.add_task("embed events", total=total)
        for topic, items in pending.items():
            svc = services[topic]
            for i in range(0, len(items), svc.batch_max):
                chunk = items[i : i + svc.batch_max]
                for (row, _), fields in zip(chunk, svc.embed([c[1] for c in chunk]), strict=True):
                    row.evidence = _evidence(svc.modality, fields)
                bar.advance(task, len(chunk))
    # Incidents: the fusion service's correlator, over the events in recording order.
    alert_of = eval_incidents.correlate_offline(
        r.sighting for r in rows if r.sighting is not None and r.evidence is not None
    )
    for r in rows:
        r.key = alert_of.get(r.event_id)
    return rows


def _evidence(modality: Modality, fields: dict[str, Any]) -> Evidence:
    """The head's view of the fields an encoder service put into an Embedding."""
    text = fields.get("text_vector")
    return Evidence(
        modality,
        decode_vector(fields["vector"], fields["dim"]),
        decode_vector(text, fields["text_dim"]) if text else None,
    )


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p95/p99 (empty input gives zeros)."""
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0}
    arr = np.asarray(values)
    return {f"p{q}": float(np.percentile(arr, q)) for q in (50, 95, 99)}


def alert_latencies_ms(alerts: list[Alert]) -> list[float]:
    """Ingest-to-alert latency of every alert version: emitted minus newest evidence's ingest."""
    return [
        (parse_ts(a.emitted_ts) - parse_ts(a.last_ingest_ts)).total_seconds() * 1000
        for a in alerts
        if a.last_ingest_ts
    ]


@dataclass
class KafkaRun:
    """What came back from one replay through the pipeline."""

    rows: list[Row]
    alerts: list[Alert]
    latest: dict[str, Alert]
    timed_out: bool


def run_via_kafka(
    folder: Path,
    live: KafkaSettings,
    models: Models | None,
    speed: float,
    timeout_s: float,
    sink_cb: Any = None,
    fusion_kw: dict[str, Any] | None = None,
) -> KafkaRun:
    """Replay ``folder`` into a live cluster (starting the pipeline here when ``models`` is given)
    and collect embeddings, alerts and dead letters until every event is accounted for."""
    from services.sink import AlertSink

    _, events = read_recording(folder)
    truth = {str(e.message.get("event_id")): e for e in events}
    collector = Collector(live, topics.EMBEDDINGS, topics.ALERTS, topics.DLQ).start()
    pipeline = None
    if models is not None:
        sink = AlertSink(live, on_alert=sink_cb) if sink_cb else None
        pipeline = Pipeline(live, models, sink, fusion_kw).start()
    started = time.time()
    skipped = {"alerts": 0, "dlq": 0}
    try:
        replay(live, folder, speed)
        deadline = time.monotonic() + timeout_s
        alerts: list[Alert] = []
        dlq: list[DeadLetter] = []
        latest: dict[str, Alert] = {}
        covered: set[str] = set()
        while True:
            # Parse only what arrived since the last look, and only what this run produced
            # (a long-lived cluster holds older alerts too).
            for r in collector.snapshot(topics.ALERTS)[len(alerts) + skipped["alerts"] :]:
                if r.timestamp / 1000 < started - 1:
                    skipped["alerts"] += 1
                    continue
                a = from_bytes(Alert, r.value)
                alerts.append(a)
                if a.alert_id not in latest or a.version > latest[a.alert_id].version:
                    latest[a.alert_id] = a
                    covered.update(e for e in a.evidence if e in truth)
            for r in collector.snapshot(topics.DLQ)[len(dlq) + skipped["dlq"] :]:
                if r.timestamp / 1000 < started - 1:
                    skipped["dlq"] += 1
                    continue
                dlq.append(from_bytes(DeadLetter, r.value))
            if len(covered) + len(dlq) >= len(truth) or time.monotonic() > deadline:
                break
            if pipeline is not None and pipeline.errors:
                raise RuntimeError("; ".join(pipeline.errors))
            time.sleep(0.2)
        embeddings = {}
        for r in collector.snapshot(topics.EMBEDDINGS):
            emb = from_bytes(Embedding, r.value)
            if emb.event_id in truth:
                embeddings[emb.event_id] = emb
    finally:
        if pipeline is not None:
            pipeline.close()
        collector.close()
    # Map dead letters back to recorded events through the payload they keep.
    dlq_ids: dict[str, str] = {}
    for d in dlq:
        try:
            dlq_ids[str(json.loads(base64.b64decode(d.payload_b64))["event_id"])] = d.reason
        except (ValueError, KeyError, TypeError):
            dlq_ids[f"?{len(dlq_ids)}"] = d.reason  # unreadable payload: counted, not matched
    rows = []
    for eid, ev in truth.items():
        row = Row(eid, ev.topic, (ev.truth or {}).get("label"), lang=ev.message.get("lang"))
        found = embeddings.get(eid)
        if found is not None:
            row.truth_incident = (ev.truth or {}).get("incident_id")
            row.key = f"none:{eid}"  # the alert holding it, set by kafka_metrics
            row.evidence = Evidence(found.modality, found.array(), found.text_array())
        row.dlq_reason = dlq_ids.get(eid)
        rows.append(row)
    timed_out = len(covered) + len(dlq) < len(truth)
    return KafkaRun(rows, alerts, latest, timed_out)


def kafka_metrics(run: KafkaRun, fusion: FusionModel) -> dict[str, Any]:
    """Metrics JSON for a Kafka run: incidents scored by the alerts that came back."""
    holder = eval_incidents.alerts_by_event(run.alerts)
    for r in run.rows:
        if r.key is not None:
            r.key = holder.get(r.event_id, r.key)  # no alert: scored as "missing"
    key_pred = {a.alert_id: a.label for a in run.latest.values()}
    out = score(run.rows, fusion, incident_pred=key_pred)
    out["latency_ms"] = percentiles(alert_latencies_ms(run.alerts))
    keys = {r.key for r in run.rows if r.key}
    per_key = Counter(a.alert_id for a in run.alerts)
    out["alerts_per_incident"] = float(np.mean([per_key.get(k, 0) for k in keys])) if keys else 0.0
    out["timed_out"] = run.timed_out
    return out


def evaluate(
    folder: Path,
    out: Path,
    via_kafka: bool = False,
    settings: KafkaSettings | None = None,
    speed: float = 0.0,
    timeout_s: float = 240.0,
    start_pipeline: bool | None = None,
    models: Models | None = None,
    task: str | None = None,
    html: Path | None = None,
) -> dict[str, Any]:
    """Score a recording and write ``out`` (JSON) and a confusion-matrix PNG beside it.

    With ``via_kafka`` the services run in this process when the broker is embedded (or
    ``start_pipeline`` is set); against an external cluster they are expected to be running.
    """
    read_recording(folder)  # fail fast on a bad folder, before loading models
    if task:
        check_task(task)  # and on a missing task head
    settings = settings or KafkaSettings()
    latencies: list[float] = []
    if via_kafka:
        if start_pipeline is None:
            start_pipeline = settings.bootstrap_servers is None
        if start_pipeline and models is None:
            models = Models.load()
        fusion = models.fusion if models else FusionModel.load()
        with cluster(settings) as live:
            run = run_via_kafka(folder, live, models if start_pipeline else None, speed, timeout_s)
            result = kafka_metrics(run, fusion)
            rows = run.rows
            latencies = alert_latencies_ms(run.alerts)
    else:
        models = models or Models.load()
        rows = offline_rows(folder, models)
        result = score(rows, models.fusion)
    if task:
        result["per_modality"]["text"][task] = score_task(folder, rows, task)
    y_true, y_pred = result.pop("_confusion")
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".confusion.png")
    names = label_names()
    metrics.plot_confusion(
        metrics.confusion(y_true, y_pred, names), names, png, f"incidents: {folder.name}"
    )
    result["confusion_png"] = str(png)
    out.write_text(json.dumps(result, indent=2))
    print_report(result, folder.name)
    if html is not None:
        from services.report_html import write_report

        write_report(html, result, rows, y_true, y_pred, folder, latencies)
    return result


def print_report(result: dict[str, Any], name: str) -> None:
    """Readable tables of a metrics JSON."""
    from rich.table import Table

    t = Table(title=f"evaluation of {name}: {result['events']} events")
    for c in ("scope", "n", "accuracy", "macro-F1"):
        t.add_column(c)
    for m, v in result["per_modality"].items():
        t.add_row(f"{m} (alone)", str(v["n"]), f"{v['accuracy']:.3f}", f"{v['macro_f1']:.3f}")
    inc = result["incidents"]
    t.add_row(
        "[bold]incidents (fused)", str(inc["n"]), f"{inc['accuracy']:.3f}", f"{inc['macro_f1']:.3f}"
    )
    console.print(t)
    console.print(per_class_table("per class (incidents)", result["per_class"], digits=2))
    console.print(f"dead letters: {result['dlq']['count']} {result['dlq']['by_reason']}")
    if result.get("timed_out"):
        console.print(
            "[yellow]timed out before every event came back: events already seen by a "
            "long-running pipeline (same event_id) are not alerted again"
        )
    if "latency_ms" in result:
        lat = result["latency_ms"]
        console.print(
            f"ingest→alert latency ms: p50 {lat['p50']:.0f}, p95 {lat['p95']:.0f}, "
            f"p99 {lat['p99']:.0f}; alerts per incident {result['alerts_per_incident']:.2f}"
        )
