"""Bytes <-> schema objects for every topic, with the DLQ reason codes for bad input."""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlparse

import numpy as np
from pydantic import BaseModel, ValidationError

from streams import topics
from streams.errors import RejectedInput
from streams.schemas import (
    Alert,
    CameraFrame,
    DeadLetter,
    Embedding,
    Feedback,
    HotlineCall,
    Media,
    Message,
    TextReport,
    utc_now,
)
from streams.settings import defaults

TOPIC_MODELS: dict[str, type[Message]] = {
    topics.TEXT: TextReport,
    topics.FRAMES: CameraFrame,
    topics.CALLS: HotlineCall,
    topics.EMBEDDINGS: Embedding,
    topics.ALERTS: Alert,
    topics.FEEDBACK: Feedback,
    topics.DLQ: DeadLetter,
}

M = TypeVar("M", bound=Message)

DLQ_PAYLOAD_MAX = 64 * 1024
DLQ_KEY_MAX = 1024
DEFAULT_MAX_MESSAGE_BYTES = defaults().limits.message_bytes
MAX_JSON_DEPTH = defaults().limits.json_depth

_STEP = np.zeros(256, dtype=np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1
# pydantic error types that have a reason code of their own in the DLQ.
_REASONS = {"string_too_long": "field_too_long", "too_long": "field_too_long"}


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays/objects in a JSON document, found without parsing it
    (vectorised, no recursion: a 12 MB message takes well under a second)."""
    # Drop escaped backslashes, then escaped quotes: every quote left opens or closes a string.
    bare = np.frombuffer(raw.replace(b"\\\\", b"").replace(b'\\"', b""), dtype=np.uint8)
    steps = _STEP[bare]
    at = np.flatnonzero(steps)
    if at.size == 0:
        return 0
    quotes = np.flatnonzero(bare == ord('"'))
    # A bracket after an odd number of quotes is inside a string.
    outside = np.searchsorted(quotes, at) % 2 == 0
    return int(np.cumsum(steps[at][outside], dtype=np.int64).max(initial=0))


def to_bytes(msg: BaseModel) -> bytes:
    """Serialise a message as compact UTF-8 JSON, leaving out unset optional fields."""
    return msg.model_dump_json(exclude_none=True).encode("utf-8")


def from_bytes(model: type[M], raw: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> M:
    """Parse and validate one message; raises :class:`RejectedInput` with a stable reason."""
    if len(raw) > max_bytes:
        raise RejectedInput("validate", "payload_too_large", f"{len(raw)} bytes > {max_bytes}")
    # json.loads recurses per nesting level: a 400 KB array of arrays raised RecursionError.
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise RejectedInput("validate", "json_too_deep", f"nesting {depth} > {MAX_JSON_DEPTH}")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RejectedInput("validate", "json_invalid", str(e)[:200]) from e
    if not isinstance(obj, dict):
        raise RejectedInput("validate", "schema_invalid", "value is not a JSON object")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = str(first["msg"])
        for code in ("unsupported_schema_version", "ts_out_of_range"):
            if code in msg:
                raise RejectedInput("validate", code, f"{where}: {msg}"[:500]) from e
        reason = _REASONS.get(first["type"], "schema_invalid")
        raise RejectedInput("validate", reason, f"{where}: {msg}"[:500]) from e


def media_root() -> Path | None:
    """The folder ``file://`` media may come from: ``$CITYFUSE_MEDIA_ROOT``, else
    ``limits.media_root`` in configs/services.json; None means no ``file://`` at all."""
    root = os.environ.get("CITYFUSE_MEDIA_ROOT") or defaults().limits.media_root
    return Path(root).resolve() if root else None


def read_media_file(uri: str, max_bytes: int) -> bytes:
    """The bytes of a ``file://`` claim check: only a regular file below the media root
    (no ``..``, no symlink out of it, no device or FIFO), read at most ``max_bytes``."""
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise RejectedInput(
            "decode", "unsupported_uri", f"scheme {parsed.scheme!r} is not fetched here"
        )
    root = media_root()
    if root is None:
        raise RejectedInput("decode", "uri_not_allowed", "file:// media is off (no media root)")
    raw_path = unquote(parsed.path)
    if parsed.netloc not in ("", "localhost") or not raw_path.startswith("/"):
        raise RejectedInput("decode", "uri_path_invalid", "file:// needs an absolute local path")
    if ".." in Path(raw_path).parts or "\0" in raw_path:
        raise RejectedInput("decode", "uri_path_invalid", "'..' in a media path")
    try:
        # resolve() follows symlinks: the real target must be below the root too.
        real = Path(raw_path).resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise RejectedInput("decode", "media_unreadable", f"{type(e).__name__}: {e}"[:200]) from e
    if not real.is_relative_to(root):
        raise RejectedInput("decode", "uri_outside_media_root", f"{raw_path} is not below {root}")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise RejectedInput("decode", "media_unreadable", f"{type(e).__name__}: {e}"[:200]) from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise RejectedInput("decode", "media_not_regular_file", f"{raw_path} is not a file")
        if st.st_size > max_bytes:
            raise RejectedInput("decode", "payload_too_large", f"{st.st_size} bytes > {max_bytes}")
        # The size can change under us: never read more than the limit (+1 to notice).
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise RejectedInput("decode", "payload_too_large", f"over {max_bytes} bytes")
    return data


def media_bytes(media: Media, max_bytes: int) -> bytes:
    """The raw bytes of inline or claim-checked (``file://``) media, bounded by ``max_bytes``."""
    if media.data_b64 is not None:
        # base64 is 4/3 the size: refuse before decoding a huge string.
        if len(media.data_b64) * 3 // 4 > max_bytes:
            raise RejectedInput("decode", "payload_too_large", f"media over {max_bytes} bytes")
        try:
            return base64.b64decode(media.data_b64, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RejectedInput("decode", "base64_invalid", str(e)[:200]) from e
    assert media.uri is not None
    return read_media_file(media.uri, max_bytes)


def dead_letter(
    err: RejectedInput,
    topic: str,
    raw: bytes,
    key: bytes | None = None,
    partition: int | None = None,
    offset: int | None = None,
) -> DeadLetter:
    """The ``city.dlq`` record for a rejected input (payload kept, truncated to 64 KiB)."""
    return DeadLetter(
        stage=err.stage,
        reason=err.reason,
        detail=err.detail[:1000],
        topic=topic,
        partition=partition,
        offset=offset,
        # A hostile key can be as large as a value: the dead letter keeps its start.
        key=key[:DLQ_KEY_MAX].decode("utf-8", "replace") if key is not None else None,
        payload_b64=base64.b64encode(raw[:DLQ_PAYLOAD_MAX]).decode("ascii"),
        ts=utc_now(),
    )
