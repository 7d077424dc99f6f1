"""Debian's chromium driven by Playwright (from PyPI, no browser download): the one launch
setup that the browser tests and ``scripts/screenshots.py`` share."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
# Offline, sandbox-free (root in CI), no background traffic, no first-run UI.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    """The system chromium (``apt-get install chromium``); raises when it is missing."""
    found = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if not found:
        raise RuntimeError("chromium is not installed (Debian: apt-get install chromium)")
    return found


@contextlib.contextmanager
def chromium_context(width: int = 1280, height: int = 860) -> Iterator[Any]:
    """A Playwright browser context on the system chromium with a fresh profile folder."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="cityfuse-chromium-")
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                profile,
                executable_path=chromium_path(),
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": width, "height": height},
            )
            try:
                yield ctx
            finally:
                ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
