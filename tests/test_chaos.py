"""Crash and scale-out on the embedded broker with ``cityfuse serve`` processes (short run of
``cityfuse chaos``): every service process SIGKILLed in turn and restarted, a second fusion and
a second vision instance join and leave, topics with 3 partitions."""

from __future__ import annotations

import subprocess
import sys


def test_chaos_command_refuses_a_tiny_run() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "chaos", "--events", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "--events" in proc.stderr
