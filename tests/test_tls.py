"""TLS client settings, end to end: Tansu has no working TLS, so a TLS-terminating proxy
written with Python's ``ssl`` (tests/tls_proxy.py) sits in front of it and the broker
advertises the proxy's port. The throwaway CA is made with ``cryptography``: no system
package is needed."""

from __future__ import annotations

import json
import socket
import ssl
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
from tests.tls_proxy import TlsProxy, make_ca_and_server_cert

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tls_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaSettings]:
    d = tmp_path_factory.mktemp("tls")
    ca, cert, key = make_ca_and_server_cert(d)
    proxy_port = free_port()
    with (
        EmbeddedBroker(advertised_port=proxy_port) as broker,
        TlsProxy(proxy_port, broker.port, cert, key),
    ):
        settings = KafkaSettings(
            bootstrap_servers=f"127.0.0.1:{proxy_port}", security_protocol="SSL", ssl_cafile=str(ca)
        )
        ensure_topics(settings)
        yield settings


def test_the_proxy_speaks_real_tls(tls_settings: KafkaSettings, tmp_path: Path) -> None:
    assert tls_settings.bootstrap_servers and tls_settings.ssl_cafile
    host, port = tls_settings.bootstrap_servers.split(":")
    trusted = ssl.create_default_context(cafile=tls_settings.ssl_cafile)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        trusted.wrap_socket(raw, server_hostname=host) as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    other_ca, _, _ = make_ca_and_server_cert(tmp_path)
    untrusting = ssl.create_default_context(cafile=str(other_ca))
    with (
        pytest.raises(ssl.SSLCertVerificationError),
        socket.create_connection((host, int(port)), timeout=10) as raw,
        untrusting.wrap_socket(raw, server_hostname=host),
    ):
        pass


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
