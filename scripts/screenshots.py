"""README screenshots of the dashboard: the demo recording through the real pipeline, then
the list, the map and an incident page in Debian's chromium (services/dashboard/browser.py).

Usage: ``python scripts/screenshots.py`` (writes docs/screenshots/{list,map,incident}.png).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.dashboard.browser import chromium_context  # noqa: E402
from services.dashboard.server import start_dashboard  # noqa: E402
from services.evaluate import run_via_kafka  # noqa: E402
from services.runtime import Models  # noqa: E402
from streams.clients import KafkaSettings, cluster  # noqa: E402
from streams.console import console  # noqa: E402

OUT = ROOT / "docs" / "screenshots"
DEMO = ROOT / "recordings" / "demo"


def _save(png: bytes, path: Path) -> None:
    """Palette PNG: a few hundred KB at most, for the repository."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    img.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    console.print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KB)")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with cluster(KafkaSettings()) as live:
        dash = start_dashboard(live)
        try:
            models = Models.load()
            run = run_via_kafka(DEMO, live, models, speed=0.0, timeout_s=300)
            console.print(f"{len(run.latest)} alerts from the demo recording")
            # The incident with the most kinds of evidence makes the most telling page.
            best = max(run.latest.values(), key=lambda a: (len(set(a.modalities)), len(a.evidence)))
            with chromium_context(1280, 900) as ctx:
                page = ctx.new_page()
                page.set_default_timeout(30_000)
                page.goto(dash.login_url)
                page.wait_for_selector("#conn.live")
                page.wait_for_selector("#alerts tbody tr")
                _save(page.screenshot(full_page=False), OUT / "list.png")
                page.click("#nav-map")
                page.wait_for_selector("#map a.marker")
                _save(page.screenshot(full_page=False), OUT / "map.png")
                page.goto(f"{dash.url}/#incident/{best.alert_id}")
                page.wait_for_selector("#inc-versions tbody tr")
                page.wait_for_function(
                    "[...document.images].every((i) => i.complete)", timeout=30_000
                )
                _save(page.screenshot(full_page=True), OUT / "incident.png")
        finally:
            dash.close()


if __name__ == "__main__":
    main()
