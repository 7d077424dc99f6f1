"""The alert sink: reads ``city.alerts`` and shows each alert version (terminal table or log line)."""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any

from kafka.consumer.fetcher import ConsumerRecord
from rich import box
from rich.table import Table

from services.base import BatchService, Output
from streams import topics
from streams.clients import KafkaSettings
from streams.console import console
from streams.errors import RejectedInput
from streams.schemas import Alert
from streams.serde import from_bytes
from streams.settings import defaults
from streams.taxonomy import labels


def colour(label: str) -> str:
    """Dashboard colour of a label (configs/labels.json)."""
    return next((lab.colour for lab in labels() if lab.name == label), "white")


def alert_row(a: Alert) -> list[str]:
    """Cells of one alert in the terminal table."""
    loc = f"{a.location.lat:.3f},{a.location.lon:.3f}" if a.location else (a.area or "-")
    return [
        f"{a.alert_id[-6:]} v{a.version}",
        f"[{colour(a.label)}]{a.label}[/] {a.confidence:.2f}",
        "+".join(m[0].upper() for m in a.modalities),
        loc,
        (a.transcript or "")[:60],
    ]


def alerts_table(alerts: Iterable[Alert], title: str = "alerts") -> Table:
    """A rich table of alerts (latest version of each)."""
    table = Table(
        title=title, box=box.SIMPLE_HEAD, caption="T text, I image, A audio (call)", pad_edge=False
    )
    for col in ("alert", "label, confidence", "T/I/A", "location"):
        table.add_column(col, no_wrap=True)
    # One line per alert, however narrow the terminal: the snippet gives way first
    # (the other columns need about 65 characters).
    snippet = max(8, min(60, console.width - 67))
    table.add_column("transcript", no_wrap=True, overflow="ellipsis", max_width=snippet)
    for a in alerts:
        table.add_row(*alert_row(a))
    return table


class AlertSink(BatchService):
    """Consumes alerts; keeps the newest version per ``alert_id`` and calls ``on_alert``."""

    name = "sink"
    input_topics = (topics.ALERTS,)

    def __init__(
        self,
        settings: KafkaSettings,
        stop: threading.Event | None = None,
        on_alert: Callable[[Alert], None] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(settings, stop, **kw)
        # Bounded like the dashboard's view: the newest alerts only.
        self.keep = defaults().dashboard.max_alerts
        self.latest: OrderedDict[str, Alert] = OrderedDict()
        self.history: deque[Alert] = deque(maxlen=self.keep)
        self.on_alert = on_alert or self.print_alert
        self.lock = threading.Lock()

    @staticmethod
    def print_alert(a: Alert) -> None:
        """Default action: one coloured line per alert version."""
        console.print(" | ".join(alert_row(a)))

    def process(self, records: list[ConsumerRecord]) -> Iterable[Output]:
        outs = []
        for rec in records:
            try:
                a = from_bytes(Alert, rec.value or b"")
            except RejectedInput as e:
                outs.append(self.reject(e, rec))
                continue
            with self.lock:
                self.history.append(a)
                prev = self.latest.get(a.alert_id)
                if prev is None or a.version >= prev.version:
                    self.latest[a.alert_id] = a
                    self.latest.move_to_end(a.alert_id)
                # Merged incidents: the superseded alerts are no longer shown.
                for gone in a.supersedes or []:
                    self.latest.pop(gone, None)
                while len(self.latest) > self.keep:
                    self.latest.popitem(last=False)
            self.on_alert(a)
        return outs
