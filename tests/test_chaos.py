"""Crash and scale-out on the embedded broker with ``cityfuse serve`` processes (short run of
``cityfuse chaos``): every service process SIGKILLed in turn and restarted, a second fusion and
a second vision instance join and leave, topics with 3 partitions.

Also the defect the long run exposed: a group leader that leaves while the group rebalances
wedged the group on Tansu for good (streams/clients.py, ``_never_leave_group``)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from services.chaos import print_report, run_chaos
from streams import topics
from streams.broker import EmbeddedBroker
from streams.clients import KafkaSettings, ensure_topics, make_consumer


# Eleven `cityfuse serve` starts that each load their models, on a fresh broker of its own:
# 146 s on this 2-core machine beside a training job. With LeaveGroup restored
# (KafkaSettings.leave_group_on_close=True) it fails: the vision and fusion groups wedged
# when their leader left mid-rebalance, and 25 of the 120 inputs were never embedded.
@pytest.mark.timeout(900)
def test_every_input_accounted_for_and_one_alert_per_incident(
    tmp_path: Path, data_dir: Path
) -> None:
    with EmbeddedBroker() as b:
        live = KafkaSettings(bootstrap_servers=b.bootstrap_servers)
        ensure_topics(live)
        c = make_consumer(live, None)
        assert all(len(c.partitions_for_topic(t) or ()) >= 2 for t in topics.INPUT_TOPICS)
        assert len(c.partitions_for_topic(topics.EMBEDDINGS) or ()) >= 2
        c.close()
        # 3 events a second; the replay holds at each action, so traffic follows every one.
        report = run_chaos(
            live,
            events=120,
            seed=5,
            duration_s=40,
            workdir=tmp_path,
            settle_s=300,
            stall_s=120,
            quiet_s=5,
        )
    print_report(report)
    logs = tmp_path / "logs"
    assert len(report.actions) == 9, report.actions  # 5 SIGKILLs, 2 joins, 2 leaves
    assert sum("SIGKILL" in a for a in report.actions) == 5
    assert all("exit 0" in a for a in report.actions if "leaves" in a)
    for service in ("text", "vision", "speech", "fusion"):
        # Killed (fusion twice) and restarted, and the last start served again.
        text = (logs / f"{service}-1.log").read_text()
        assert "--- start 1 ---" in text
        assert "serving " in text.rsplit("--- start ", 1)[-1]
    assert (logs / "fusion-2.log").exists() and (logs / "vision-2.log").exists()
    # 1. every input ends as an embedding or a dead letter
    assert report.inputs >= 120
    assert report.missing == []
    assert report.embeddings + report.dead_letters == report.inputs
    assert report.dead_letters >= 1  # the recording's broken frames
    # 2. each truth incident has exactly one alert id
    assert report.incidents_without_alert == [] and report.incidents_split == []
    assert report.alerts == report.truth_incidents
    # 3. no (alert_id, version) twice with different content
    assert report.conflicting_versions == []
    assert not report.timed_out


def test_a_leader_leaving_during_a_rebalance_does_not_stall_the_group(
    settings: KafkaSettings,
) -> None:
    group = f"wedge-{uuid.uuid4().hex[:8]}"
    leader = make_consumer(settings, group, topics.FRAMES)
    deadline = time.monotonic() + 30
    while not leader.assignment() and time.monotonic() < deadline:
        leader.poll(timeout_ms=200)
    assert len(leader.assignment()) == 3, "the first member should lead and own every partition"

    joiner = make_consumer(settings, group, topics.FRAMES)
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            joiner.poll(timeout_ms=200)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)  # the joiner's JoinGroup is in: the group is rebalancing
        leader.close()  # ... and its leader goes away (SIGTERM of `cityfuse serve`)
        # Before the fix the LeaveGroup left Tansu with a departed leader: every SyncGroup
        # answered RebalanceInProgress and the joiner never got a partition. Now the leader
        # is evicted by session timeout (6 s) and the joiner takes over.
        deadline = time.monotonic() + 40
        while len(joiner.assignment()) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(joiner.assignment()) == 3
    finally:
        stop.set()
        thread.join(10)
        joiner.close()


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
