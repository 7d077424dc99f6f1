"""The three encoder services: validate + decode each record, one forward pass per batch, emit embeddings."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
from kafka.consumer.fetcher import ConsumerRecord

from models.audio import AudioLimits, decode_audio
from models.images import ImageLimits, decode_image
from models.speech import SpeechEncoder, call_version
from models.text import TextEncoder
from models.vision import frame_view
from services.base import BatchService, Output
from services.speedups import (
    decode_all,
    forward_pass,
    serve_speech,
    serve_text,
    serve_vision,
)
from streams import topics
from streams.clients import KafkaSettings
from streams.correlation import routing_keys
from streams.errors import RejectedInput
from streams.schemas import (
    CameraFrame,
    Embedding,
    EncoderRef,
    HotlineCall,
    InputEvent,
    Modality,
    TextReport,
    encode_vector,
)
from streams.serde import from_bytes, media_bytes, to_bytes


def _ingest_ts(rec: ConsumerRecord) -> str:
    """When the record was produced (the Kafka record timestamp), as ISO 8601 UTC."""
    return (
        datetime.fromtimestamp(rec.timestamp / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


class EncoderService(BatchService):
    """Common shape of the text, vision and speech services.

    ``encoder`` is any model with ``name``, ``version`` and ``encode(batch) -> (n, d) array``.
    """

    modality: Modality = "text"
    schema: type[InputEvent] = InputEvent

    def __init__(
        self, settings: KafkaSettings, encoder: Any, stop: threading.Event | None = None, **kw: Any
    ) -> None:
        super().__init__(settings, stop, **kw)
        self.encoder = encoder

    def decode(self, event: Any) -> Any:
        """The model input of one validated event; raises RejectedInput."""
        raise NotImplementedError

    def embed(self, inputs: list[Any]) -> list[dict[str, Any]]:
        """One forward pass over the batch: per input, the Embedding fields it adds."""
        return [
            {"vector": encode_vector(v), "dim": v.shape[0]} for v in self.encoder.encode(inputs)
        ]

    @property
    def encoder_ref(self) -> EncoderRef:
        """Name and version of the encoder (for the Embedding's ``encoder`` field)."""
        return EncoderRef(name=self.encoder.name, version=self.encoder.version)

    def read(self, rec: ConsumerRecord) -> tuple[InputEvent, Any]:
        """Validate and decode one record. Every failure is a RejectedInput with its stage:
        a bug or an odd library error on hostile bytes must not stop the service."""
        try:
            event = from_bytes(self.schema, rec.value or b"")
        except RejectedInput:
            raise
        except Exception as e:  # e.g. RecursionError/MemoryError-class surprises in parsing
            raise RejectedInput(
                "validate", "validate_error", f"{type(e).__name__}: {e}"[:500]
            ) from e
        try:
            return event, self.decode(event)
        except RejectedInput:
            raise
        except Exception as e:
            raise RejectedInput("decode", "decode_error", f"{type(e).__name__}: {e}"[:500]) from e

    def embed_bisect(self, inputs: list[Any]) -> list[dict[str, Any] | RejectedInput]:
        """:meth:`embed` over the batch; when the forward pass fails, the batch is split in two
        and each half retried, so only inputs that fail on their own are rejected."""
        try:
            return list(self.embed(inputs))
        except Exception as e:
            if len(inputs) == 1:
                return [RejectedInput("infer", "inference_error", f"{type(e).__name__}: {e}"[:500])]
        mid = len(inputs) // 2
        return self.embed_bisect(inputs[:mid]) + self.embed_bisect(inputs[mid:])

    def process(self, records: list[ConsumerRecord]) -> Iterable[Output]:
        """Validate, decode, embed the batch; bad records go to the DLQ, the rest to embeddings."""
        outs: list[Output] = []
        good: list[tuple[ConsumerRecord, InputEvent, Any]] = []
        # Records decode in parallel on a small pool (services/speedups.py).
        for rec, read in zip(records, decode_all(self.read, records), strict=True):
            if isinstance(read, RejectedInput):
                outs.append(self.reject(read, rec))
            else:
                good.append((rec, *read))
        if not good:
            return outs
        with forward_pass():
            results = self.embed_bisect([g[2] for g in good])
        for (rec, event, _), fields in zip(good, results, strict=True):
            if isinstance(fields, RejectedInput):
                outs.append(self.reject(fields, rec))
                continue
            keys = routing_keys(event)
            emb = Embedding(
                event_id=event.event_id,
                modality=self.modality,
                correlation_key=keys[0],
                ts=event.ts,
                location=event.location,
                area=event.area,
                incident_id=event.incident_id,
                encoder=self.encoder_ref,
                ingest_ts=_ingest_ts(rec),
                source_topic=rec.topic,
                **fields,
            )
            # A border event goes to every tile it may belong to (streams/correlation.py).
            outs.extend(Output(topics.EMBEDDINGS, k, to_bytes(emb)) for k in keys)
        return outs


class TextService(EncoderService):
    """Citizen text reports → text-view embeddings (the encoder put in its served precision,
    ``configs/services.json`` → ``serving``)."""

    name = "text"
    input_topics = (topics.TEXT,)
    modality: Modality = "text"
    schema = TextReport

    def __init__(
        self, settings: KafkaSettings, encoder: Any, stop: threading.Event | None = None, **kw: Any
    ) -> None:
        super().__init__(settings, serve_text(encoder), stop, **kw)

    def decode(self, event: TextReport) -> str:
        return event.text


class VisionService(EncoderService):
    """Camera frames → EfficientNet-Lite0 embeddings (bounded image decoding)."""

    name = "vision"
    input_topics = (topics.FRAMES,)
    modality: Modality = "image"
    schema = CameraFrame
    limits = ImageLimits()

    def __init__(
        self, settings: KafkaSettings, encoder: Any, stop: threading.Event | None = None, **kw: Any
    ) -> None:
        super().__init__(settings, serve_vision(encoder), stop, **kw)
        if self.limits.draft_px:
            # JPEGs are DCT-scaled while decoding; never below what the served artifact reads
            # (288 px since the tenth study), or a large frame would be upscaled back to it.
            draft = max(self.limits.draft_px, int(self.encoder.size))
            self.limits = replace(self.limits, draft_px=draft)

    def decode(self, event: CameraFrame) -> Any:
        # The camera id travels with the frame: the encoder judges each frame against its
        # camera's usual view (models/camera_reference.py).
        image = decode_image(media_bytes(event.media, self.limits.max_bytes), self.limits)
        # Resized and cropped here, on the decode pool, rather than serially before the pass.
        return frame_view(image, self.encoder.size, self.encoder.view), event.camera_id

    def embed(self, inputs: list[Any]) -> list[dict[str, Any]]:
        vecs = self.encoder.encode([i[0] for i in inputs], camera_ids=[i[1] for i in inputs])
        return [{"vector": encode_vector(v), "dim": v.shape[0]} for v in vecs]


class SpeechService(EncoderService):
    """Hotline calls → Whisper encoder embedding + transcript (+ the transcript's MiniLM vector)."""

    name = "speech"
    input_topics = (topics.CALLS,)
    modality: Modality = "audio"
    schema = HotlineCall
    limits = AudioLimits()

    def __init__(
        self,
        settings: KafkaSettings,
        speech: SpeechEncoder,
        text: TextEncoder,
        stop: threading.Event | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(settings, serve_speech(speech), stop, **kw)
        self.text = serve_text(text)  # transcripts' vectors: the same served text view

    @property
    def encoder_ref(self) -> EncoderRef:
        return EncoderRef(
            name=self.encoder.name, version=call_version(self.encoder.version, self.text.version)
        )

    def decode(self, event: HotlineCall) -> np.ndarray:
        raw = media_bytes(event.media, self.limits.max_bytes)
        return decode_audio(raw, event.media.content_type, self.limits)

    def embed(self, inputs: list[np.ndarray]) -> list[dict[str, Any]]:
        vecs, transcripts = self.encoder.encode(inputs)
        tvecs = self.text.encode([t or " " for t in transcripts])
        return [
            {
                "vector": encode_vector(v),
                "dim": v.shape[0],
                "transcript": t,
                "text_vector": encode_vector(tv) if t.strip() else None,
                "text_dim": tv.shape[0] if t.strip() else None,
            }
            for v, t, tv in zip(vecs, transcripts, tvecs, strict=True)
        ]
