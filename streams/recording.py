"""Recordings: a folder with ``manifest.json``, ``events.jsonl`` and ``media/`` (DESIGN.md)."""

from __future__ import annotations

import base64
import mimetypes
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from streams import topics
from streams.schemas import utc_now
from streams.taxonomy import package_folder

FORMAT = "cityfuse-recording"
VERSION = 1


def demo_recording() -> Path:
    """The bundled demo recording (package data of ``recordings``)."""
    return package_folder("recordings") / "demo"


class RecordingError(ValueError):
    """A folder that is not a readable recording."""


class Manifest(BaseModel):
    """``manifest.json``."""

    format: str = FORMAT
    version: int = VERSION
    name: str
    description: str = ""
    created: str = Field(default_factory=utc_now)
    labels: list[str] = []
    tasks: list[str] = []
    provenance: list[dict[str, Any]] = []


class RecordedEvent(BaseModel):
    """One line of ``events.jsonl``; ``truth`` never goes onto a topic."""

    t: float = Field(ge=0)
    topic: str
    message: dict[str, Any]
    truth: dict[str, Any] | None = None


def read_recording(folder: Path) -> tuple[Manifest, list[RecordedEvent]]:
    """Read and check a recording; events come back sorted by ``t``."""
    if not folder.is_dir():
        raise RecordingError(f"{folder}: not a folder")
    try:
        manifest = Manifest.model_validate_json((folder / "manifest.json").read_text())
    except FileNotFoundError as e:
        raise RecordingError(f"{folder}: no manifest.json") from e
    except ValidationError as e:
        raise RecordingError(f"{folder}/manifest.json: {e.errors()[0]['msg']}") from e
    if manifest.format != FORMAT or manifest.version != VERSION:
        raise RecordingError(
            f"{folder}: format {manifest.format} v{manifest.version} is not {FORMAT} v{VERSION}"
        )
    events = []
    try:
        lines = (folder / "events.jsonl").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as e:
        raise RecordingError(f"{folder}: no events.jsonl") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ev = RecordedEvent.model_validate_json(line)
        except ValidationError as e:
            raise RecordingError(f"{folder}/events.jsonl line {n}: {e.errors()[0]['msg']}") from e
        if ev.topic not in topics.INPUT_TOPICS:
            raise RecordingError(f"events.jsonl line {n}: topic {ev.topic} is not an input topic")
        events.append(ev)
    return manifest, sorted(events, key=lambda e: e.t)


def inline_media(message: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The message as it goes on the topic: ``media.path`` replaced by inline base64."""
    media = message.get("media")
    if not isinstance(media, dict) or "path" not in media:
        return message
    path = (folder / media["path"]).resolve()
    if folder.resolve() not in path.parents:
        raise RecordingError(f"media path escapes the recording: {media['path']}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RecordingError(f"media missing: {media['path']}") from e
    out = dict(message)
    out["media"] = {
        "content_type": media.get("content_type") or mimetypes.guess_type(path.name)[0],
        "data_b64": base64.b64encode(data).decode("ascii"),
    }
    return out


def record_key(topic: str, message: dict[str, Any]) -> str | None:
    """The Kafka key an input message travels with (DESIGN.md topic table)."""
    if topic == topics.FRAMES:
        return str(message.get("camera_id"))
    if topic == topics.CALLS:
        return str(message.get("call_id"))
    return message.get("incident_id")


class RecordingWriter:
    """Writes a recording, moving inline media out into ``media/``."""

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        self.folder = folder
        (folder / "media").mkdir(parents=True, exist_ok=True)
        (folder / "manifest.json").write_text(manifest.model_dump_json(indent=2))
        self._events = (folder / "events.jsonl").open("w", encoding="utf-8")
        self.count = 0

    def add(
        self, t: float, topic: str, message: dict[str, Any], truth: dict[str, Any] | None = None
    ) -> None:
        """Append one event (media given inline are written to a file)."""
        msg = dict(message)
        media = msg.get("media")
        if isinstance(media, dict) and media.get("data_b64"):
            ext = mimetypes.guess_extension(media.get("content_type", "")) or ".bin"
            safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(msg.get("event_id", "x")))[:40]
            name = f"media/{self.count:06d}-{safe}{ext}"
            (self.folder / name).write_bytes(base64.b64decode(media["data_b64"]))
            msg["media"] = {"content_type": media.get("content_type"), "path": name}
        line = RecordedEvent(t=t, topic=topic, message=msg, truth=truth)
        self._events.write(line.model_dump_json(exclude_none=True) + "\n")
        self.count += 1

    def close(self) -> None:
        """Flush and close ``events.jsonl``."""
        self._events.close()
