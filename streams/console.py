"""The shared rich console and progress bar style for long work (conversion, training, replay, bench)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def progress() -> Progress:
    """A progress bar on stderr: description, bar, n/m, elapsed, remaining."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def per_class_table(
    title: str, per_class: dict[str, dict[str, float]], first: str = "label", digits: int = 3
) -> Any:
    """A rich table of per-class precision, recall, F1 and support (evaluate and --task share it)."""
    from rich.table import Table

    t = Table(title=title)
    for c in (first, "precision", "recall", "f1", "support"):
        t.add_column(c)
    for name, v in per_class.items():
        t.add_row(
            name,
            f"{v['precision']:.{digits}f}",
            f"{v['recall']:.{digits}f}",
            f"{v['f1']:.{digits}f}",
            str(int(v["support"])),
        )
    return t
