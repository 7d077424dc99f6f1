"""Each encoder measured two ways on the same events: naive and served.

Naive is what a tutorial does: one message, one forward pass, fp32 reference weights
(MiniLM + e5 per report; a full PIL decode and resize per frame; ``whisper.transcribe``
per call, padded to the 30-second window). Served is the services' own ``process`` path
(validation, bounded decoding, micro-batch forward pass, output serialisation), fed with
the records a Kafka poll would hand over, without the broker.
"""

from __future__ import annotations

import base64
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.samples import Sample, records
from models.audio import decode_audio
from models.text import TextEncoder
from models.vision import VisionEncoder
from services.encoders import EncoderService
from streams import topics
from streams.schemas import CameraFrame, Embedding, HotlineCall, TextReport
from streams.serde import from_bytes

Advance = Callable[[int], None]


@dataclass
class Output:
    """What one event produced: its vector, and for calls the transcript and its text vector."""

    vector: np.ndarray
    transcript: str | None = None
    text_vector: np.ndarray | None = None


@dataclass
class Run:
    """One way of embedding a list of events, timed."""

    n: int
    seconds: float
    outputs: list[Output | None] = field(default_factory=list)  # None: rejected
    embeddings: list[bytes] = field(default_factory=list)  # served: the city.embeddings values

    @property
    def rate(self) -> float:
        """Events per second."""
        return self.n / self.seconds if self.seconds > 0 else 0.0


def _timed(samples: list[Sample], one: Callable[[Sample], Output], advance: Advance) -> Run:
    one(samples[0])  # warm-up: first-call allocations are not throughput
    outs: list[Output | None] = []
    t0 = time.perf_counter()
    for s in samples:
        outs.append(one(s))
        advance(1)
    return Run(len(samples), time.perf_counter() - t0, outs)


def naive_text(ref: TextEncoder, samples: list[Sample], advance: Advance) -> Run:
    """Per report: parse, then the fp32 text view (MiniLM tokenizer + model, e5) on one text."""

    def one(s: Sample) -> Output:
        event = from_bytes(TextReport, s.value("naive"))
        return Output(ref.encode([event.text])[0])

    return _timed(samples, one, advance)


def naive_image(ref: VisionEncoder, samples: list[Sample], advance: Advance) -> Run:
    """Per frame: parse, full PIL decode to RGB, resize + crop, one fp32 forward pass."""

    def one(s: Sample) -> Output:
        event = from_bytes(CameraFrame, s.value("naive"))
        raw = base64.b64decode(event.media.data_b64 or "")
        img = Image.open(io.BytesIO(raw)).convert("RGB")
        return Output(ref.encode([img])[0])

    return _timed(samples, one, advance)


def naive_audio(
    whisper_model: Any, ref_text: TextEncoder, samples: list[Sample], advance: Advance
) -> Run:
    """Per call: parse, decode, ``whisper.transcribe`` (30-s window), embed the transcript.

    The call's embedding is read from the encoder pass ``transcribe`` runs anyway (a forward
    hook), pooled over the frames that cover real audio as the speech service does."""
    import whisper

    feats: list[torch.Tensor] = []
    hook = whisper_model.encoder.register_forward_hook(lambda _m, _i, out: feats.append(out))

    def one(s: Sample) -> Output:
        event = from_bytes(HotlineCall, s.value("naive"))
        audio = decode_audio(base64.b64decode(event.media.data_b64 or ""))
        feats.clear()
        result = whisper.transcribe(
            whisper_model,
            audio,
            fp16=False,
            language="en",
            temperature=0.0,
            condition_on_previous_text=False,
            without_timestamps=True,
            verbose=None,
        )
        n = max(1, math.ceil(len(audio) / whisper.audio.N_SAMPLES_PER_TOKEN))
        vec = torch.nn.functional.normalize(feats[0][0, :n].mean(0), dim=-1).numpy()
        text = str(result["text"]).strip()
        return Output(vec.astype(np.float32), text, ref_text.encode([text or " "])[0])

    try:
        return _timed(samples, one, advance)
    finally:
        hook.remove()


def served(svc: EncoderService, samples: list[Sample], advance: Advance) -> Run:
    """The service's own ``process`` on micro-batches of ``batch_max`` records."""
    recs = records(samples, "served")
    svc.process(recs[: svc.batch_max])  # warm-up
    produced: list[Any] = []
    t0 = time.perf_counter()
    for i in range(0, len(recs), svc.batch_max):
        chunk = recs[i : i + svc.batch_max]
        produced.extend(svc.process(chunk))
        advance(len(chunk))
    seconds = time.perf_counter() - t0
    by_id: dict[str, Output] = {}
    values = [out.value for out in produced if out.topic == topics.EMBEDDINGS]
    for out in produced:
        if out.topic == topics.EMBEDDINGS:
            emb = from_bytes(Embedding, out.value)
            by_id[emb.event_id] = Output(emb.array(), emb.transcript, emb.text_array())
    outputs = [by_id.get(f"served-{i}") for i in range(len(recs))]
    return Run(len(recs), seconds, outputs, values)
