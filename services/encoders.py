"""The three encoder services: validate + decode each record, one forward pass per batch, emit embeddings."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import numpy as np
from kafka.consumer.fetcher import ConsumerRecord

from models.audio import AudioLimits, decode_audio
from models.images import ImageLimits, decode_image
from models.speech import SpeechEncoder
from models.text import TextEncoder
from services.base import BatchService, Output
from streams import topics
from streams.clients import KafkaSettings
from streams.correlation import correlation_key
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

    def process(self, records: list[ConsumerRecord]) -> Iterable[Output]:
        """Validate, decode, embed the batch; bad records go to the DLQ, the rest to embeddings."""
        outs: list[Output] = []
        good: list[tuple[ConsumerRecord, InputEvent, Any]] = []
        for rec in records:
            try:
                event = from_bytes(self.schema, rec.value or b"")
                good.append((rec, event, self.decode(event)))
            except RejectedInput as e:
                outs.append(self.reject(e, rec))
        if not good:
            return outs
        try:
            results = self.embed([g[2] for g in good])
        except Exception as e:
            err = RejectedInput("infer", "inference_error", f"{type(e).__name__}: {e}")
            return outs + [self.reject(err, rec) for rec, _, _ in good]
        for (rec, event, _), fields in zip(good, results, strict=True):
            key = correlation_key(event)
            emb = Embedding(
                event_id=event.event_id,
                modality=self.modality,
                correlation_key=key,
                ts=event.ts,
                location=event.location,
                area=event.area,
                incident_id=event.incident_id,
                encoder=self.encoder_ref,
                ingest_ts=_ingest_ts(rec),
                source_topic=rec.topic,
                **fields,
            )
            outs.append(Output(topics.EMBEDDINGS, key, to_bytes(emb)))
        return outs


class TextService(EncoderService):
    """Citizen text reports → MiniLM embeddings."""

    name = "text"
    input_topics = (topics.TEXT,)
    modality: Modality = "text"
    schema = TextReport

    def decode(self, event: TextReport) -> str:
        return event.text


class VisionService(EncoderService):
    """Camera frames → EfficientNet-Lite0 embeddings (bounded image decoding)."""

    name = "vision"
    input_topics = (topics.FRAMES,)
    modality: Modality = "image"
    schema = CameraFrame
    limits = ImageLimits()

    def decode(self, event: CameraFrame) -> Any:
        return decode_image(media_bytes(event.media, self.limits.max_bytes), self.limits)


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
        super().__init__(settings, speech, stop, **kw)
        self.text = text

    @property
    def encoder_ref(self) -> EncoderRef:
        return EncoderRef(
            name=self.encoder.name, version=f"{self.encoder.version}+{self.text.version}"
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
