"""``evaluate --html``: a self-contained report of a real offline evaluation of the demo."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from services.evaluate import evaluate
from services.report_html import histogram_svg

DEMO = Path(__file__).resolve().parent.parent / "recordings" / "demo"


def test_html_report_is_self_contained_and_complete(models: Any, tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    result = evaluate(DEMO, tmp_path / "metrics.json", models=models, html=report)
    html = report.read_text()
    # Nothing is fetched: no external URL in any src/href, media inline as data: URIs.
    assert not re.search(r'(src|href)="(?!data:)', html)
    assert "<script" not in html
    assert 'class="cm"' in html and "Per class" in html and "Per modality" in html
    for label in result["per_class"]:
        assert label in html
    if result["incidents"]["accuracy"] < 1.0:  # the misses are listed with evidence
        assert "misclassified" in html and "data:image/jpeg;base64," in html


def test_latency_histogram_marks_percentiles() -> None:
    svg = histogram_svg([100.0, 120.0, 130.0, 900.0] * 5)
    assert svg.startswith("<svg") and "p50 125 ms" in svg and "p95 900 ms" in svg
    assert "no latencies" in histogram_svg([])
