"""Message contract of every topic (DESIGN.md "Topics"), as pydantic models.

Unknown extra fields are ignored (forward compatibility); a missing or wrong-typed
required field is a validation failure and the message goes to ``city.dlq``.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from streams.settings import defaults
from streams.taxonomy import label_names

SCHEMA_VERSION = 1

IMAGE_TYPES = ("image/jpeg", "image/png")
AUDIO_TYPES = ("audio/ogg", "audio/wav", "audio/flac", "audio/mpeg")
Modality = Literal["text", "image", "audio"]
MODALITIES: tuple[Modality, ...] = ("text", "image", "audio")

# Bounds from configs/services.json ("limits"): every string field has a maximum length.
_LIM = defaults().limits
IdStr = Annotated[str, Field(max_length=_LIM.id_chars)]
NameStr = Annotated[str, Field(max_length=_LIM.name_chars)]
FreeText = Annotated[str, Field(max_length=_LIM.text_chars)]
UriStr = Annotated[str, Field(max_length=_LIM.uri_chars)]


def utc_now() -> str:
    """Current time as an ISO 8601 UTC string (the format of every ``ts`` field)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_ts(ts: str) -> datetime:
    """Parse an ISO 8601 timestamp; naive times are taken as UTC."""
    dt = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def check_ts_range(ts: str) -> str:
    """An event time must be plausible: not beyond ``limits.ts_future_s`` from now, not older
    than ``limits.ts_past_s`` (a year-9999 or year-1 time would poison windows and TTLs)."""
    if len(ts) > 64:
        raise ValueError("ts_out_of_range: not an ISO 8601 time")
    age = (datetime.now(UTC) - parse_ts(ts)).total_seconds()
    if age < -_LIM.ts_future_s or age > _LIM.ts_past_s:
        raise ValueError(f"ts_out_of_range: {ts} is {age:.0f} s from now")
    return ts


class Message(BaseModel):
    """Base of every topic value: ignores unknown fields, carries ``schema_version``."""

    model_config = ConfigDict(extra="ignore", strict=False)
    schema_version: int = SCHEMA_VERSION

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            # A distinct error so the DLQ reason can say unsupported_schema_version.
            raise ValueError(f"unsupported_schema_version {v}")
        return v


class Location(BaseModel):
    """A WGS 84 point."""

    lat: float = Field(ge=-90, le=90, allow_inf_nan=False)
    lon: float = Field(ge=-180, le=180, allow_inf_nan=False)


class Media(BaseModel):
    """Inline (base64) or claim-check (``uri``) media."""

    model_config = ConfigDict(extra="ignore")
    content_type: NameStr
    # Inline media is bounded by limits.message_bytes (checked before parsing).
    data_b64: str | None = None
    uri: UriStr | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Media:
        if not self.data_b64 and not self.uri:
            raise ValueError("media needs data_b64 or uri")
        return self


def _content_type_in(allowed: tuple[str, ...]) -> Callable[[Media], Media]:
    def check(m: Media) -> Media:
        if m.content_type not in allowed:
            raise ValueError(f"content_type must be one of {allowed}")
        return m

    return check


class InputEvent(Message):
    """Fields common to all three input topics."""

    event_id: str = Field(min_length=1, max_length=_LIM.id_chars)
    ts: str
    source: NameStr = "unknown"
    incident_id: IdStr | None = None
    location: Location | None = None
    area: NameStr | None = None

    @field_validator("ts")
    @classmethod
    def _iso_ts(cls, v: str) -> str:
        return check_ts_range(v)


class TextReport(InputEvent):
    """A citizen text report."""

    text: str = Field(min_length=1, max_length=_LIM.text_chars)
    lang: NameStr | None = None


class CameraFrame(InputEvent):
    """One frame of a city camera."""

    camera_id: IdStr
    media: Annotated[Media, AfterValidator(_content_type_in(IMAGE_TYPES))]
    frame_index: int | None = None


class HotlineCall(InputEvent):
    """One hotline call recording."""

    call_id: IdStr
    media: Annotated[Media, AfterValidator(_content_type_in(AUDIO_TYPES))]
    duration_s: float | None = Field(default=None, allow_inf_nan=False)


class EncoderRef(BaseModel):
    """Which encoder (and artifact version) made a vector."""

    name: str
    version: str


class Embedding(Message):
    """One input event embedded by its encoder; keyed by correlation key on ``city.embeddings``."""

    event_id: str
    modality: Modality
    correlation_key: str
    ts: str
    location: Location | None = None
    area: str | None = None
    incident_id: str | None = None
    vector: str  # base64 of little-endian float32
    dim: int
    # Speech only: the transcript's text-encoder vector, so fusion can read the words too.
    text_vector: str | None = None
    text_dim: int | None = None
    encoder: EncoderRef
    transcript: str | None = None
    ingest_ts: str
    probs: dict[str, float] | None = None
    source_topic: str | None = None

    def array(self) -> np.ndarray:
        """The embedding as a float32 vector."""
        return decode_vector(self.vector, self.dim)

    def text_array(self) -> np.ndarray | None:
        """The transcript's text vector, when there is one."""
        if self.text_vector is None or self.text_dim is None:
            return None
        return decode_vector(self.text_vector, self.text_dim)


class Alert(Message):
    """The public contract of ``city.alerts`` (JSON Schema: ``docs/schemas/alert.v1.json``)."""

    alert_id: str
    version: int = Field(ge=1)
    incident_id: str
    correlation_key: str
    label: str
    confidence: float = Field(ge=0, le=1)
    probs: dict[str, float]
    modalities: list[Modality]
    contributions: dict[str, float]
    # The newest evidence ids (at most limits.evidence_ids of them) and how many there were.
    evidence: list[str]
    evidence_count: int | None = None
    # Alerts this one replaces: incidents found to be one were merged into this alert.
    supersedes: list[str] | None = None
    location: Location | None = None
    area: str | None = None
    transcript: str | None = None
    first_event_ts: str
    emitted_ts: str
    model_version: str
    # When the newest evidence entered the pipeline: lets anyone measure ingest-to-alert latency.
    last_ingest_ts: str | None = None


class Feedback(Message):
    """An operator's verdict on one version of an alert (JSON Schema: ``docs/schemas/feedback.v1.json``).

    ``label`` is what the operator says the incident is: the alert's own label for
    ``confirm``, ``no_incident`` for ``reject`` (a false alarm), the new label for ``relabel``.
    """

    operator: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@ -]+$")
    alert_id: str = Field(min_length=1, max_length=200)
    version: int = Field(ge=1)
    action: Literal["confirm", "reject", "relabel"]
    label: str
    note: str = Field(default="", max_length=2000)
    ts: str

    @field_validator("label")
    @classmethod
    def _known_label(cls, v: str) -> str:
        if v not in label_names():
            raise ValueError(f"unknown label {v!r}")
        return v

    @field_validator("ts")
    @classmethod
    def _iso_ts(cls, v: str) -> str:
        parse_ts(v)
        return v

    @model_validator(mode="after")
    def _reject_means_no_incident(self) -> Feedback:
        if self.action == "reject" and self.label != "no_incident":
            raise ValueError("reject (false alarm) carries label no_incident")
        return self


class DeadLetter(Message):
    """A rejected input, with where and why it was rejected."""

    stage: Literal["decode", "validate", "infer", "fuse"]
    reason: str
    detail: str = ""
    topic: str
    partition: int | None = None
    offset: int | None = None
    key: str | None = None
    payload_b64: str
    ts: str


def encode_vector(v: np.ndarray) -> str:
    """Base64 of a vector as little-endian float32."""
    return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")


def decode_vector(s: str, dim: int) -> np.ndarray:
    """Inverse of :func:`encode_vector`; checks the length against ``dim``."""
    arr = np.frombuffer(base64.b64decode(s), dtype="<f4")
    if arr.shape != (dim,):
        raise ValueError(f"vector has {arr.size} values, expected {dim}")
    return arr.astype(np.float32)
