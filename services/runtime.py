"""Running the whole pipeline in one process: loaded models, service threads, topic collectors."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from models.fusion import FusionModel
from models.speech import SpeechEncoder
from models.text import TextEncoder
from models.vision import VisionEncoder
from services.base import BatchService
from services.encoders import SpeechService, TextService, VisionService
from services.fusion import FusionService
from services.sink import AlertSink
from streams.clients import KafkaSettings, assign_all, make_consumer
from streams.console import console

log = logging.getLogger(__name__)


@dataclass
class Models:
    """Every model the pipeline runs, loaded once and shared by services and evaluation."""

    text: TextEncoder
    vision: VisionEncoder
    speech: SpeechEncoder
    fusion: FusionModel

    @classmethod
    def load(cls) -> Models:
        """Load all encoders and the fusion head (first run converts Whisper, with a progress bar)."""
        t0 = time.perf_counter()
        speech = SpeechEncoder()  # may convert weights: its own progress bar
        with console.status("loading text and vision encoders and the fusion head"):
            models = cls(TextEncoder(), VisionEncoder(), speech, FusionModel.load())
        console.print(
            f"models loaded in {time.perf_counter() - t0:.1f}s (fusion {models.fusion.version})"
        )
        return models


class Pipeline:
    """Text, vision, speech, fusion services (and optionally a sink) as threads of this process."""

    def __init__(
        self,
        settings: KafkaSettings,
        models: Models,
        sink: AlertSink | None = None,
        fusion_kw: dict[str, Any] | None = None,
    ) -> None:
        self.stop = threading.Event()
        self.services: list[BatchService] = [
            TextService(settings, models.text, self.stop),
            VisionService(settings, models.vision, self.stop),
            SpeechService(settings, models.speech, models.text, self.stop),
            FusionService(settings, models.fusion, self.stop, **(fusion_kw or {})),
        ]
        if sink is not None:
            sink.stop = self.stop
            self.services.append(sink)
        self.threads = [
            threading.Thread(target=self._run, args=(s,), name=s.name, daemon=True)
            for s in self.services
        ]
        self.errors: list[str] = []

    def _run(self, svc: BatchService) -> None:
        try:
            svc.run()
        except Exception as e:
            log.exception("service %s crashed", svc.name)
            self.errors.append(f"{svc.name}: {type(e).__name__}: {e}")
            self.stop.set()

    def start(self, wait_s: float = 60.0) -> Pipeline:
        """Start every service thread and wait until each has joined its consumer group, so
        that measured latencies do not include the one-time join (seconds on Tansu)."""
        for t in self.threads:
            t.start()
        deadline = time.monotonic() + wait_s
        for svc in self.services:
            svc.ready.wait(max(0.0, deadline - time.monotonic()))
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Ask every service to finish its batch, commit and exit; wait for them."""
        self.stop.set()
        for t in self.threads:
            t.join(timeout)

    def __enter__(self) -> Pipeline:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class Collector:
    """Reads topics from the beginning without a consumer group (no join delay) into lists."""

    def __init__(self, settings: KafkaSettings, *topic_names: str) -> None:
        self.settings = settings
        self.topics = topic_names
        self.records: dict[str, list[Any]] = {t: [] for t in topic_names}
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="collector", daemon=True)

    def _run(self) -> None:
        consumer = make_consumer(self.settings, None)
        try:
            assign_all(consumer, *self.topics)
            consumer.seek_to_beginning()
            while not self.stop.is_set():
                for tp, recs in consumer.poll(timeout_ms=100).items():
                    with self.lock:
                        self.records[tp.topic].extend(recs)
        finally:
            consumer.close()

    def snapshot(self, topic: str) -> list[Any]:
        """A copy of what was read so far from ``topic``."""
        with self.lock:
            return list(self.records[topic])

    def start(self) -> Collector:
        """Start reading in a background thread."""
        self.thread.start()
        return self

    def close(self) -> None:
        """Stop reading."""
        self.stop.set()
        self.thread.join(5)
