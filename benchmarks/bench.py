"""``cityfuse bench``: encoder throughput, end-to-end replay through Kafka, peak memory.

Speed targets live here, not in tests. Results print as a table and go to a JSON file.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

from services.evaluate import kafka_metrics, run_via_kafka
from services.runtime import Models
from streams.clients import KafkaSettings, cluster
from streams.console import console, progress
from streams.recording import inline_media, read_recording


def _encoder_throughput(models: Models, folder: Path, repeats: int) -> dict[str, dict[str, float]]:
    """Events per second of each encoder service's decode + one batched forward pass."""
    from services.evaluate import _services
    from streams.serde import from_bytes

    _, events = read_recording(folder)
    services = _services(models)
    out: dict[str, dict[str, float]] = {}
    with progress() as bar:
        task = bar.add_task("bench encoders", total=len(services) * repeats)
        for topic, svc in services.items():
            inputs = []
            for ev in events:
                if ev.topic != topic:
                    continue
                try:
                    event = from_bytes(
                        svc.schema, json.dumps(inline_media(ev.message, folder)).encode()
                    )
                    inputs.append(svc.decode(event))
                except Exception:
                    continue
            batch = inputs[: svc.batch_max]
            svc.embed(batch)  # warm-up
            t0 = time.perf_counter()
            for _ in range(repeats):
                svc.embed(batch)
                bar.advance(task)
            dt = (time.perf_counter() - t0) / repeats
            out[svc.name] = {
                "batch": len(batch),
                "seconds_per_batch": dt,
                "events_per_s": len(batch) / dt,
            }
    return out


def run_bench(folder: Path, out: Path, repeats: int = 3) -> dict[str, Any]:
    """Run all benchmarks and write ``out``."""
    models = Models.load()
    result: dict[str, Any] = {"encoders": _encoder_throughput(models, folder, repeats)}
    _, events = read_recording(folder)
    with cluster(KafkaSettings()) as live:
        t0 = time.perf_counter()
        run = run_via_kafka(folder, live, models, speed=0.0, timeout_s=300)
        wall = time.perf_counter() - t0
    m = kafka_metrics(run, models.fusion)
    result["end_to_end"] = {
        "events": len(events),
        "seconds": wall,
        "events_per_s": len(events) / wall,
        "latency_ms": m["latency_ms"],
        "incident_accuracy": m["incidents"]["accuracy"],
    }
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    _print(result)
    return result


def _print(r: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title="encoder throughput (decode excluded, one batched pass)")
    for c in ("service", "batch", "s / batch", "events / s"):
        t.add_column(c)
    for name, v in r["encoders"].items():
        t.add_row(
            name, str(v["batch"]), f"{v['seconds_per_batch']:.3f}", f"{v['events_per_s']:.1f}"
        )
    console.print(t)
    e = r["end_to_end"]
    console.print(
        f"end to end through Kafka: {e['events']} events in {e['seconds']:.1f}s "
        f"({e['events_per_s']:.1f}/s, incl. group joins); latency p50 {e['latency_ms']['p50']:.0f} ms, "
        f"p95 {e['latency_ms']['p95']:.0f} ms; peak RSS {r['peak_rss_mb']:.0f} MB"
    )
