"""``cityfuse serve`` as a real process: SIGTERM finishes the batch, commits and exits."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from kafka import KafkaAdminClient

from streams import topics
from streams.broker import EmbeddedBroker
from streams.clients import KafkaSettings, ensure_topics
from tests.kafka_helpers import event, reader, send


def _committed(settings: KafkaSettings, group: str) -> int:
    admin = KafkaAdminClient(**settings.common())
    try:
        offsets = admin.list_group_offsets(group)
    finally:
        admin.close()
    per_tp = offsets.get(group, offsets)  # kafka-python 3 nests by group
    return sum(o.offset for tp, o in per_tp.items() if tp.topic == topics.TEXT and o.offset > 0)


def test_sigterm_commits_and_exits_cleanly() -> None:
    with EmbeddedBroker() as broker:
        settings = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        ensure_topics(settings)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.cli",
                "serve",
                "text",
                "--bootstrap-servers",
                broker.bootstrap_servers,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            for i in range(5):
                send(
                    settings,
                    topics.TEXT,
                    event(incident_id=f"s{i}", text=f"Report number {i}: smoke in the tunnel"),
                )
            embeddings = reader(settings, topics.EMBEDDINGS)
            seen = 0
            deadline = time.monotonic() + 90
            while seen < 5 and time.monotonic() < deadline:
                seen += sum(len(r) for r in embeddings.poll(timeout_ms=300).values())
            embeddings.close()
            assert seen == 5
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        assert "batches committed" in err
        assert _committed(settings, "cityfuse-text") == 5
