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

from streams import topics
from streams.clients import KafkaSettings, make_consumer


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
