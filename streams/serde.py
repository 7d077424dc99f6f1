"""Bytes <-> schema objects for every topic, with the DLQ reason codes for bad input."""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlparse

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
DEFAULT_MAX_MESSAGE_BYTES = defaults().limits.message_bytes


def to_bytes(msg: BaseModel) -> bytes:
    """Serialise a message as compact UTF-8 JSON, leaving out unset optional fields."""
    return msg.model_dump_json(exclude_none=True).encode("utf-8")


def from_bytes(model: type[M], raw: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> M:
    """Parse and validate one message; raises :class:`RejectedInput` with a stable reason."""
    if len(raw) > max_bytes:
        raise RejectedInput("validate", "payload_too_large", f"{len(raw)} bytes > {max_bytes}")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RejectedInput("validate", "json_invalid", str(e)[:200]) from e
    if not isinstance(obj, dict):
        raise RejectedInput("validate", "schema_invalid", "value is not a JSON object")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if where == "schema_version" and "unsupported_schema_version" in first["msg"]:
            raise RejectedInput("validate", "unsupported_schema_version", first["msg"]) from e
        raise RejectedInput("validate", "schema_invalid", f"{where}: {first['msg']}") from e


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
    uri = urlparse(media.uri)
    if uri.scheme != "file":
        raise RejectedInput(
            "decode", "unsupported_uri", f"scheme {uri.scheme!r} is not fetched here"
        )
    path = Path(unquote(uri.path))
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise RejectedInput("decode", "payload_too_large", f"{size} bytes > {max_bytes}")
        return path.read_bytes()
    except OSError as e:
        raise RejectedInput("decode", "media_unreadable", str(e)[:200]) from e


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
        key=key.decode("utf-8", "replace") if key is not None else None,
        payload_b64=base64.b64encode(raw[:DLQ_PAYLOAD_MAX]).decode("ascii"),
        ts=utc_now(),
    )
