"""``cityfuse serve``: one service (or all) as a long-running process."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from services.base import BatchService
from streams.clients import KafkaSettings, cluster
from streams.console import console

log = logging.getLogger(__name__)


def build(name: str, settings: KafkaSettings, stop: threading.Event) -> list[BatchService]:
    """The service objects for ``name`` (loading only the models they need)."""
    from services.encoders import SpeechService, TextService, VisionService
    from services.fusion import FusionService
    from services.sink import AlertSink

    if name == "text":
        from models.text import TextEncoder

        return [TextService(settings, TextEncoder(), stop)]
    if name == "vision":
        from models.vision import VisionEncoder

        return [VisionService(settings, VisionEncoder(), stop)]
    if name == "speech":
        from models.speech import SpeechEncoder
        from models.text import TextEncoder

        return [SpeechService(settings, SpeechEncoder(), TextEncoder(), stop)]
    if name == "fusion":
        from models.fusion import FusionModel

        return [FusionService(settings, FusionModel.load(), stop)]
    if name == "sink":
        return [AlertSink(settings, stop)]
    return [
        s for n in ("text", "vision", "speech", "fusion", "sink") for s in build(n, settings, stop)
    ]


class ServiceDied(RuntimeError):
    """A service of ``cityfuse serve`` stopped on its own (the others were stopped too)."""


def run_services(services: list[BatchService], stop: threading.Event) -> None:
    """Run each service in a thread until ``stop`` is set or ANY of them ends.

    A service that ends by itself (an exception, or a return without ``stop``) stops all the
    others (``serve all`` never carries on with one of them dead) and raises
    :class:`ServiceDied`, so the process exits non-zero and a supervisor restarts it."""
    errors: dict[str, str] = {}

    def run(svc: BatchService) -> None:
        try:
            svc.run()
        except BaseException as e:
            log.exception("service %s died", svc.name)
            errors[svc.name] = f"{type(e).__name__}: {e}"
        finally:
            if not stop.is_set():
                errors.setdefault(svc.name, "stopped without being asked to")
                stop.set()

    threads = [threading.Thread(target=run, args=(s,), name=s.name, daemon=True) for s in services]
    for t in threads:
        t.start()
    while not stop.wait(0.5):
        pass
    for t in threads:
        t.join(30)
    if errors:
        raise ServiceDied("; ".join(f"{n}: {e}" for n, e in errors.items()))


def serve(settings: KafkaSettings, name: str, metrics_port: int | None = None) -> None:
    """Run until SIGTERM or Ctrl-C; each service finishes and commits its batch before exiting.

    Raises :class:`ServiceDied` (exit status 2 from the CLI) when a service dies."""
    stop = threading.Event()

    def on_signal(*_: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if metrics_port is not None:
        from prometheus_client import start_http_server

        # Loopback unless told otherwise: in a container Prometheus scrapes from outside
        # (docker/compose.yaml sets CITYFUSE_METRICS_ADDR=0.0.0.0).
        start_http_server(metrics_port, addr=os.environ.get("CITYFUSE_METRICS_ADDR", "127.0.0.1"))
    with cluster(settings) as live:
        services = build(name, live, stop)
        console.print(
            f"serving {', '.join(s.name for s in services)} on {live.bootstrap_servers}"
            " (Ctrl-C to stop)"
        )
        run_services(services, stop)
    console.print("stopped: batches committed")
