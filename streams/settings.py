"""Default service settings, read once from ``configs/services.json`` (their only home)."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel

from streams.taxonomy import CONFIG_DIR


class Correlation(BaseModel):
    """How events are grouped into incidents (docs/correlation.md)."""

    # Join: within radius_m of an open incident's located events and window_s (event time)
    # of its span.
    radius_m: float
    window_s: float
    # Routing: the city.embeddings key is a route_m tile; events within border_m of an edge
    # are also sent to the neighbouring tile.
    route_m: float
    border_m: float


class Batch(BaseModel):
    """Micro-batch bounds of one service: up to ``max`` records or ``ms`` milliseconds."""

    max: int
    ms: int


class Fusion(BaseModel):
    """When fusion speaks: confidence threshold, wait for unconfident incidents, state TTL."""

    threshold: float
    pending_s: float
    # State is dropped ttl_s after an incident's last evidence reached city.embeddings.
    ttl_s: float


class Limits(BaseModel):
    """Bounds on what decoders accept (bad input beyond them goes to the DLQ)."""

    message_bytes: int
    image_bytes: int
    image_pixels: int
    audio_bytes: int
    audio_seconds: float
    # Frames: width/height ratio either way, and the size JPEGs are draft-decoded towards.
    image_aspect_max: float
    image_draft_px: int
    # Audio: containers (PyAV format names) and codecs accepted, checked before decoding.
    audio_containers: list[str]
    audio_codecs: list[str]
    # file:// media only below this folder (relative: to the working directory); null = no
    # file:// at all. $CITYFUSE_MEDIA_ROOT overrides it.
    media_root: str | None
    # JSON: nesting depth, checked before parsing.
    json_depth: int
    # String fields (characters): ids and names, free text, URIs.
    id_chars: int
    name_chars: int
    text_chars: int
    uri_chars: int
    # Timestamps accepted: this far into the future / this far back (seconds from now).
    ts_future_s: float
    ts_past_s: float
    # Alerts keep the newest N evidence ids (and the total count).
    evidence_ids: int
    # A failed send is retried this often (doubling back-off) before the service stops.
    send_retries: int
    send_backoff_s: float


class Dashboard(BaseModel):
    """The operator dashboard: default port and the bounds of what it keeps in memory."""

    port: int
    max_alerts: int
    cache_events: int
    cache_bytes: int
    throughput_window_s: float
    sse_queue: int


class LearnUpdate(BaseModel):
    """Hyper-parameters of one ``cityfuse learn`` update (``models.continual.LearnConfig``
    documents each; chosen by ``scripts/learning_curve.py --select``, README)."""

    steps: int
    lr: float
    rehearsal_batch: int
    feedback_batch: int
    rehearsal_ce: float
    rehearsal_p_single: float
    distill: float
    distill_temperature: float
    l2sp: float
    ewc: float
    fisher_samples: int
    trainable: Literal["all", "experts", "feedback_experts", "feedback_output"]
    dropout: bool
    holdout: float
    check_every: int
    stop_rise: float


class Learn(BaseModel):
    """Continual learning: the folder of learned fusion heads (``CURRENT`` names the live one)
    and the update's hyper-parameters."""

    model_dir: str
    update: LearnUpdate


class Serving(BaseModel):
    """How the encoder services run their forward passes (``services/speedups.py``; each
    variant is measured with its quality guard by ``cityfuse bench``, docs/performance.md).

    ``auto`` picks bf16 where the CPU has native bf16 (AMX or AVX512-BF16), else fp32."""

    # Text view (fine-tuned e5 or MiniLM): bf16 = bf16 Linear weights under CPU autocast
    # (LayerNorm, softmax and pooling stay fp32); int8 = dynamic int8 Linear layers.
    text_precision: Literal["auto", "fp32", "bf16", "int8"]
    # EfficientNet-Lite0: bf16 autocast; jit = a frozen TorchScript graph (BatchNorm folded
    # into the convolutions); frames go through it ``image_chunk`` at a time (activations
    # of a few 224 px frames stay in cache, a whole micro-batch's do not).
    image_precision: Literal["auto", "fp32", "bf16"]
    image_jit: bool
    image_chunk: int
    # torch (the options above) or OpenVINO's CPU plugin (models/openvino_cpu.py; jit then
    # shapes only the torch fallback, should OpenVINO fail to compile).
    image_backend: Literal["torch", "openvino"]
    # Whisper's encoder (the call embedding; the decoder reads its output): bf16 autocast.
    audio_encoder_precision: Literal["auto", "fp32", "bf16"]
    # torch, or OpenVINO's CPU plugin for the encoder (the greedy decoder stays in torch).
    audio_encoder_backend: Literal["torch", "openvino"]
    # One encoder forward pass at a time per process (services sharing a process, e.g.
    # ``serve all`` or the bench's pipeline, otherwise run their OpenMP teams side by side
    # and each waits at barriers for threads the other one holds).
    forward_lock: bool


class ServiceDefaults(BaseModel):
    """Everything in ``configs/services.json``."""

    correlation: Correlation
    batch: dict[str, Batch]
    fusion: Fusion
    limits: Limits
    dashboard: Dashboard
    learn: Learn
    serving: Serving


@lru_cache(maxsize=1)
def defaults() -> ServiceDefaults:
    """The parsed, validated service defaults."""
    return ServiceDefaults.model_validate(
        json.loads((CONFIG_DIR / "services.json").read_text(encoding="utf-8"))
    )
