"""TLS client settings, end to end: Tansu has no working TLS, so a real TLS-terminating
proxy (Debian stunnel4, installed by .ci/run) sits in front of it and the broker advertises
the proxy's port. A throwaway CA is made here with openssl."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from streams import topics
from streams.broker import EmbeddedBroker, free_port
from streams.clients import KafkaSettings, ensure_topics, make_producer
from tests.kafka_helpers import reader

REPO = Path(__file__).resolve().parent.parent


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca_and_server_cert(d: Path) -> None:
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=cityfuse-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=d,
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
        cwd=d,
    )


@pytest.fixture(scope="module")
def tls_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaSettings]:
    stunnel = shutil.which("stunnel4") or shutil.which("stunnel")
    assert stunnel, "stunnel4 is required (Debian package; .ci/run installs it)"
    d = tmp_path_factory.mktemp("tls")
    _make_ca_and_server_cert(d)
    proxy = free_port()
    with EmbeddedBroker(advertised_port=proxy) as broker:
        (d / "stunnel.conf").write_text(
            f"foreground = yes\npid =\n[kafka]\naccept = 127.0.0.1:{proxy}\n"
            f"connect = 127.0.0.1:{broker.port}\ncert = {d}/server.pem\nkey = {d}/server.key\n"
        )
        proc = subprocess.Popen(
            [stunnel, str(d / "stunnel.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", proxy)) == 0:
                        break
                time.sleep(0.1)
            settings = KafkaSettings(
                bootstrap_servers=f"127.0.0.1:{proxy}",
                security_protocol="SSL",
                ssl_cafile=str(d / "ca.pem"),
            )
            ensure_topics(settings)
            yield settings
        finally:
            proc.terminate()
            proc.wait(10)


def test_produce_and_consume_over_tls(tls_settings: KafkaSettings) -> None:
    p = make_producer(tls_settings)
    p.send(topics.FEEDBACK, key=b"a1", value=b'{"hello": "tls"}').get(timeout=20)
    p.close()
    c = reader(tls_settings, topics.FEEDBACK)
    got: list[bytes] = []
    deadline = time.monotonic() + 30
    while not got and time.monotonic() < deadline:
        for recs in c.poll(timeout_ms=300).values():
            got.extend(r.value for r in recs)
    c.close()
    assert got == [b'{"hello": "tls"}']


def test_cli_replay_uses_the_tls_settings(tls_settings: KafkaSettings) -> None:
    assert tls_settings.ssl_cafile and tls_settings.bootstrap_servers
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "replay",
            str(REPO / "recordings/demo"),
            "--speed",
            "0",
            "--bootstrap-servers",
            tls_settings.bootstrap_servers,
            "--security-protocol",
            "SSL",
            "--ssl-cafile",
            tls_settings.ssl_cafile,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    events = [
        json.loads(line)
        for line in (REPO / "recordings/demo/events.jsonl").read_text().splitlines()
    ]
    frames = sum(e["topic"] == topics.FRAMES for e in events)
    c = reader(tls_settings, topics.FRAMES)
    seen = 0
    deadline = time.monotonic() + 30
    while seen < frames and time.monotonic() < deadline:
        seen += sum(len(recs) for recs in c.poll(timeout_ms=300).values())
    c.close()
    assert seen == frames
