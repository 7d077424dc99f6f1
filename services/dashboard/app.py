"""The dashboard web app (Starlette): static page, JSON API, server-sent events, feedback.

Security: every ``/api`` route needs the token (``Authorization: Bearer``, ``X-Token`` or
``?token=`` for what the browser loads by URL: the event stream, images and audio); the
page itself holds no data. A strict Content-Security-Policy allows only this origin's
scripts, so message text can never run even if a bug rendered it as HTML.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from kafka import KafkaProducer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.dashboard.reader import group_lag
from services.dashboard.state import DashboardState
from streams import topics
from streams.clients import KafkaSettings, make_producer
from streams.schemas import Feedback, utc_now
from streams.serde import to_bytes
from streams.settings import defaults
from streams.taxonomy import labels

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
EVENT_ID_MAX = 200

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "media-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


class FeedbackIn(BaseModel):
    """What the browser posts; the server adds ``ts`` and builds the :class:`Feedback`."""

    model_config = ConfigDict(extra="forbid")
    alert_id: str = Field(min_length=1, max_length=200)
    version: int = Field(ge=1)
    action: str
    label: str
    operator: str
    note: str = ""


class Dashboard:
    """The app plus what it needs: state, token, producer for feedback."""

    def __init__(self, settings: KafkaSettings, state: DashboardState, token: str) -> None:
        if len(token) < 16:
            raise ValueError("dashboard token must be at least 16 characters")
        self.settings = settings
        self.state = state
        self.token = token
        self._producer: KafkaProducer | None = None
        self._producer_lock = threading.Lock()
        self._health_cache: tuple[float, dict[str, Any]] | None = None
        self.app = Starlette(
            routes=[
                Route("/", self.index),
                Route("/api/config", self.guard(self.config)),
                Route("/api/alerts", self.guard(self.alerts)),
                Route("/api/alerts/{alert_id:path}", self.guard(self.incident)),
                Route("/api/media/{event_id:path}", self.guard(self.media)),
                Route("/api/events", self.guard(self.events)),
                Route("/api/health", self.guard(self.health)),
                Route("/api/feedback", self.guard(self.feedback), methods=["POST"]),
                Mount("/static", StaticFiles(directory=STATIC), name="static"),
            ],
            middleware=[Middleware(SecurityHeaders)],
        )

    # -- auth ----------------------------------------------------------------------------
    def authorised(self, request: Request) -> bool:
        """Constant-time check of the token from a header or the query string."""
        given = request.headers.get("x-token") or request.query_params.get("token") or ""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), self.token.encode())

    def guard(
        self, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """Wrap an endpoint: 401 without the right token."""

        async def wrapped(request: Request) -> Response:
            if not self.authorised(request):
                return JSONResponse({"error": "missing or wrong token"}, status_code=401)
            return await handler(request)

        return wrapped

    # -- pages and reads -----------------------------------------------------------------
    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def config(self, request: Request) -> Response:
        return JSONResponse(
            {
                "labels": [
                    {"name": lab.name, "colour": lab.colour, "description": lab.description}
                    for lab in labels()
                ],
                "ttl_s": defaults().fusion.ttl_s,
            }
        )

    async def alerts(self, request: Request) -> Response:
        return JSONResponse({"alerts": self.state.rows()})

    async def incident(self, request: Request) -> Response:
        alert_id = request.path_params["alert_id"]
        if not (0 < len(alert_id) <= 200):
            return JSONResponse({"error": "bad alert_id"}, status_code=400)
        found = self.state.incident(alert_id)
        if found is None:
            return JSONResponse({"error": "unknown alert"}, status_code=404)
        return JSONResponse(found)

    async def media(self, request: Request) -> Response:
        event_id = request.path_params["event_id"]
        if not (0 < len(event_id) <= EVENT_ID_MAX):
            return JSONResponse({"error": "bad event_id"}, status_code=400)
        found = self.state.media(event_id)
        if found is None:
            return JSONResponse({"error": "no media cached for this event"}, status_code=404)
        data, ctype = found
        # Only the content types the schemas admit are served, so nothing is sniffed as HTML.
        if not (ctype.startswith("image/") or ctype.startswith("audio/")):
            return JSONResponse({"error": "unsupported media type"}, status_code=415)
        return Response(data, media_type=ctype)

    async def health(self, request: Request) -> Response:
        now = time.monotonic()
        if self._health_cache is None or now - self._health_cache[0] > 2.0:
            try:
                lag = await asyncio.to_thread(group_lag, self.settings, dict(self.state.highwater))
                err = None
            except Exception as e:  # the panel says so rather than failing the page
                lag, err = {}, f"{type(e).__name__}: {e}"
            body = {
                "groups": lag,
                "lag_error": err,
                "throughput": self.state.throughput(),
                **self.state.stats(),
            }
            self._health_cache = (now, body)
        return JSONResponse(self._health_cache[1])

    async def events(self, request: Request) -> Response:
        sub = self.state.subscribe(asyncio.get_running_loop())

        async def stream() -> AsyncIterator[str]:
            try:
                yield "retry: 2000\n\n"
                while not sub.overflowed:
                    try:
                        yield await asyncio.wait_for(sub.queue.get(), timeout=15)
                    except TimeoutError:
                        if await request.is_disconnected():
                            break
                        yield ": keep-alive\n\n"
            finally:
                self.state.unsubscribe(sub)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"X-Accel-Buffering": "no"},
        )

    # -- writes --------------------------------------------------------------------------
    async def feedback(self, request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return JSONResponse({"error": "send application/json"}, status_code=415)
        body = await request.body()
        if len(body) > 8192:
            return JSONResponse({"error": "body too large"}, status_code=413)
        try:
            raw = json.loads(body)
            got = FeedbackIn.model_validate(raw)
            fb = Feedback.model_validate({**got.model_dump(), "ts": utc_now()})
        except (json.JSONDecodeError, UnicodeDecodeError):
            return JSONResponse({"error": "body is not JSON"}, status_code=400)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            return JSONResponse({"error": f"{where}: {first['msg']}"}, status_code=422)
        if not self.state.version_exists(fb.alert_id, fb.version):
            return JSONResponse({"error": "unknown alert version"}, status_code=404)
        await asyncio.to_thread(self._send, fb)
        return JSONResponse({"ok": True, "feedback": fb.model_dump(mode="json")}, status_code=201)

    def _send(self, fb: Feedback) -> None:
        with self._producer_lock:
            if self._producer is None:
                self._producer = make_producer(self.settings)
            self._producer.send(topics.FEEDBACK, key=fb.alert_id.encode(), value=to_bytes(fb))
            self._producer.flush(timeout=10)

    def close(self) -> None:
        """Close the feedback producer."""
        with self._producer_lock:
            if self._producer is not None:
                self._producer.close()
                self._producer = None


class SecurityHeaders:
    """Pure ASGI middleware (safe with streaming responses): adds :data:`SECURITY_HEADERS`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in SECURITY_HEADERS.items():
                    if k not in headers:
                        headers[k] = v
            await send(message)

        await self.app(scope, receive, send_with_headers)
