"""Crash and scale-out on the embedded broker with ``cityfuse serve`` processes (short run of
``cityfuse chaos``): every service process SIGKILLed in turn and restarted, a second fusion and
a second vision instance join and leave, topics with 3 partitions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from kafka import KafkaConsumer

from services.chaos import print_report, run_chaos
from streams import topics
from streams.broker import EmbeddedBroker
from streams.clients import KafkaSettings, ensure_topics


# Eleven process starts that each load models (not timed on an idle machine; at load average
# 30-80 the run took over 10 minutes), hence its own timeout.
@pytest.mark.timeout(1800)
def test_every_input_accounted_for_and_one_alert_per_incident(tmp_path: Path) -> None:
    with EmbeddedBroker() as b:
        settings = KafkaSettings(bootstrap_servers=b.bootstrap_servers)
        ensure_topics(settings)
        c = KafkaConsumer(bootstrap_servers=b.bootstrap_servers)
        assert all(len(c.partitions_for_topic(t) or ()) >= 2 for t in topics.INPUT_TOPICS)
        assert len(c.partitions_for_topic(topics.EMBEDDINGS) or ()) >= 2
        c.close()
        report = run_chaos(settings, events=100, seed=5, duration_s=20, workdir=tmp_path)
    print_report(report)
    assert len(report.actions) == 9  # 5 SIGKILLs, 2 joins, 2 leaves
    assert sum("SIGKILL" in a for a in report.actions) == 5
    assert all("exit 0" in a for a in report.actions if "leaves" in a)
    assert report.inputs >= 100
    assert report.embeddings + report.dead_letters == report.inputs
    assert report.missing == []
    assert report.dead_letters >= 1  # the broken frames of the recording
    assert report.incidents_without_alert == [] and report.incidents_split == []
    assert report.alerts == report.truth_incidents
    assert report.conflicting_versions == []
    assert not report.timed_out


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
