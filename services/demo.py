"""``cityfuse demo``: the whole pipeline on the bundled recording, alerts live, then a summary."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.live import Live
from rich.table import Table

from services.dashboard.server import start_dashboard
from services.evaluate import KafkaRun, kafka_metrics, run_via_kafka
from services.runtime import Models
from services.sink import alerts_table
from streams.clients import KafkaSettings, cluster
from streams.console import console
from streams.recording import read_recording
from streams.schemas import Alert


def run_demo(
    settings: KafkaSettings,
    recording: Path,
    speed: float,
    summary_json: Path | None,
    timeout_s: float,
    dashboard: bool = False,
) -> dict[str, Any]:
    """Run the demo and return (and optionally write) its summary; with ``dashboard`` the
    operator dashboard serves beside it (URL with token printed) until Ctrl-C."""
    t0 = time.monotonic()
    manifest, events = read_recording(recording)
    console.rule(f"CityFuse demo: {manifest.name} ({len(events)} events)")
    with cluster(settings) as live_settings:
        where = settings.bootstrap_servers or f"embedded Tansu at {live_settings.bootstrap_servers}"
        console.print(f"broker: {where}")
        dash = start_dashboard(live_settings) if dashboard else None
        if dash is not None:
            console.print(f"dashboard: [bold]{dash.login_url}[/]")
        try:
            models = Models.load()
            latest: dict[str, Alert] = {}
            with Live(
                alerts_table([], "alerts (live)"), console=console, refresh_per_second=4
            ) as view:

                def on_alert(a: Alert) -> None:
                    latest[a.alert_id] = a
                    view.update(
                        alerts_table(
                            sorted(latest.values(), key=lambda x: x.first_event_ts),
                            "alerts (live)",
                        )
                    )

                run = run_via_kafka(recording, live_settings, models, speed, timeout_s, on_alert)
            result = kafka_metrics(run, models.fusion)
            summary = _summary(manifest.name, result, run, time.monotonic() - t0)
            print_summary(summary)
            if summary_json is not None:
                summary_json.parent.mkdir(parents=True, exist_ok=True)
                summary_json.write_text(json.dumps(summary, indent=2))
                console.print(f"summary written to {summary_json}")
            if dash is not None:
                # The embedded broker lives as long as this block: keep serving until Ctrl-C.
                console.print(
                    f"dashboard still serving at [bold]{dash.login_url}[/]; Ctrl-C to stop"
                )
                # time.sleep, not Event.wait: Ctrl-C must interrupt it cleanly.
                while True:
                    time.sleep(3600)
        finally:
            if dash is not None:
                dash.close()
    return summary


def _summary(name: str, result: dict[str, Any], run: KafkaRun, seconds: float) -> dict[str, Any]:
    return {
        "recording": name,
        "events": result["events"],
        "alerts": len(run.latest),
        "alert_versions": len(run.alerts),
        "incidents": result["incidents"]["n"],
        "incident_accuracy": result["incidents"]["accuracy"],
        "incident_macro_f1": result["incidents"]["macro_f1"],
        "latency_ms": {k: result["latency_ms"][k] for k in ("p50", "p95")},
        "dlq": result["dlq"],
        "timed_out": run.timed_out,
        "seconds": round(seconds, 1),
    }


def print_summary(s: dict[str, Any]) -> None:
    """The closing table of the demo."""
    t = Table(title="demo summary", show_header=False)
    t.add_row("events replayed", str(s["events"]))
    t.add_row("alerts (versions)", f"{s['alerts']} ({s['alert_versions']})")
    t.add_row("incidents", str(s["incidents"]))
    t.add_row("incident accuracy", f"{s['incident_accuracy']:.3f}")
    t.add_row(
        "ingest→alert p50 / p95",
        f"{s['latency_ms']['p50']:.0f} ms / {s['latency_ms']['p95']:.0f} ms",
    )
    t.add_row("dead letters", f"{s['dlq']['count']} {s['dlq']['by_reason']}")
    t.add_row("wall time", f"{s['seconds']} s" + (" (timed out waiting)" if s["timed_out"] else ""))
    console.print(t)
