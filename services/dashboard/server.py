"""Starting the dashboard: token, topic reader, uvicorn (in the foreground or a thread)."""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import quote

import uvicorn

from services.dashboard.app import Dashboard
from services.dashboard.reader import TopicReader
from services.dashboard.state import DashboardState
from streams.clients import KafkaSettings

TOKEN_ENV = "CITYFUSE_DASHBOARD_TOKEN"


def resolve_token(given: str | None = None) -> str:
    """The access token: given, else ``$CITYFUSE_DASHBOARD_TOKEN``, else a fresh random one."""
    token = given or os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24)
    if len(token) < 16:
        raise ValueError(f"{TOKEN_ENV}: the token must be at least 16 characters")
    return token


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _ThreadServer(uvicorn.Server):
    """uvicorn in a non-main thread: leaves the process's signal handlers alone."""

    def install_signal_handlers(self) -> None:  # older uvicorn
        pass


@dataclass
class RunningDashboard:
    """A dashboard serving in background threads; ``close()`` stops it."""

    url: str
    token: str
    dashboard: Dashboard
    reader: TopicReader
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def login_url(self) -> str:
        """The URL to open, token included (the page moves it out of the address bar)."""
        return f"{self.url}/#token={quote(self.token)}"

    def close(self) -> None:
        """Stop serving and reading."""
        self.server.should_exit = True
        self.thread.join(10)
        self.reader.close()
        self.dashboard.close()


def build(settings: KafkaSettings, token: str) -> tuple[Dashboard, TopicReader]:
    """The app and its reader (not started)."""
    state = DashboardState()
    return Dashboard(settings, state, token), TopicReader(settings, state)


def start_dashboard(
    settings: KafkaSettings, host: str = "127.0.0.1", port: int = 0, token: str | None = None
) -> RunningDashboard:
    """Start reader and web server in threads; returns once the server accepts connections."""
    token = resolve_token(token)
    dash, reader = build(settings, token)
    reader.start()
    port = port or free_port(host)
    config = uvicorn.Config(dash.app, host=host, port=port, log_level="warning", lifespan="off")
    server = _ThreadServer(config)
    thread = threading.Thread(target=server.run, name="dashboard-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"dashboard did not start on {host}:{port}")
        time.sleep(0.05)
    shown = f"[{host}]" if ":" in host else host
    return RunningDashboard(f"http://{shown}:{port}", token, dash, reader, server, thread)


def serve_forever(settings: KafkaSettings, host: str, port: int | None, token: str | None) -> None:
    """``cityfuse dashboard``: serve until Ctrl-C, printing the URL with its token."""
    from streams.console import console
    from streams.settings import defaults

    running = start_dashboard(
        settings, host, defaults().dashboard.port if port is None else port, token
    )
    console.print(f"dashboard: [bold]{running.login_url}[/]")
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]bound to {host}: reachable from other machines (token required)")
    try:
        # time.sleep, not Event.wait: Ctrl-C must interrupt it cleanly.
        while True:
            time.sleep(3600)
    finally:
        running.close()
