"""The embedded broker: loopback only, topics created, stopped without orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from kafka import KafkaAdminClient

from streams import topics
from streams.broker import EmbeddedBroker
from streams.clients import KafkaSettings


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_session_broker_has_all_topics(settings: KafkaSettings) -> None:
    admin = KafkaAdminClient(**settings.common())
    try:
        names = set(admin.list_topics())
    finally:
        admin.close()
    assert {t.name for t in topics.ALL_TOPICS} <= names
    assert settings.bootstrap_servers and settings.bootstrap_servers.startswith("127.0.0.1:")


def test_broker_is_stopped_when_the_block_fails() -> None:
    with pytest.raises(RuntimeError), EmbeddedBroker() as b:
        assert b.proc is not None
        pid = b.proc.pid
        assert _alive(pid)
        raise RuntimeError("boom")
    assert not _alive(pid)


def test_ctrl_c_on_the_cli_leaves_no_broker_behind() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "broker"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    line = ""
    while time.monotonic() < deadline and "ready" not in line:
        line = proc.stderr.readline()
    assert "ready" in line, line
    children = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True
    ).stdout.split()
    assert children, "the broker should run as a child process"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    time.sleep(0.5)
    assert not any(_alive(int(pid)) for pid in children)
