"""Bounded, in-process audio decoding (PyAV) to the 16 kHz mono float32 that Whisper expects."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import av
import numpy as np

from streams.errors import RejectedInput
from streams.settings import defaults

SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class AudioLimits:
    """Upper bounds for one audio payload; larger inputs are rejected, never truncated."""

    max_bytes: int = field(default_factory=lambda: defaults().limits.audio_bytes)
    max_seconds: float = field(default_factory=lambda: defaults().limits.audio_seconds)
    # PyAV container format names and decoder names accepted (checked before decoding).
    containers: tuple[str, ...] = field(
        default_factory=lambda: tuple(defaults().limits.audio_containers)
    )
    codecs: tuple[str, ...] = field(default_factory=lambda: tuple(defaults().limits.audio_codecs))


def check_formats(
    container: av.container.InputContainer, limits: AudioLimits, claimed: str
) -> None:
    """Refuse any container or codec outside the allow-list before a frame is decoded: FFmpeg
    can demux hundreds of formats, and each is attack surface."""
    names = set(container.format.name.split(","))
    if not names & set(limits.containers):
        raise RejectedInput(
            "decode", "audio_container_not_allowed", f"container {container.format.name}{claimed}"
        )
    codec = container.streams.audio[0].codec_context.name
    if codec not in limits.codecs:
        raise RejectedInput("decode", "audio_codec_not_allowed", f"codec {codec}{claimed}")


def decode_audio(
    data: bytes, content_type: str | None = None, limits: AudioLimits = AudioLimits()
) -> np.ndarray:
    """Decode an allowed audio payload (Ogg Opus/Vorbis, WAV PCM, FLAC, MP3) to float32 mono
    16 kHz samples.

    The container format is detected from the bytes; ``content_type`` is only reported in error
    details, because client-supplied types are often wrong. Raises ``RejectedInput`` with reason
    ``payload_too_large``, ``audio_too_long``, ``audio_container_not_allowed``,
    ``audio_codec_not_allowed`` or ``audio_decode_error``.
    """
    if len(data) > limits.max_bytes:
        raise RejectedInput(
            "decode", "payload_too_large", f"{len(data)} bytes > {limits.max_bytes}"
        )
    claimed = f" (content-type {content_type})" if content_type else ""
    max_samples = int(limits.max_seconds * SAMPLE_RATE)

    def too_long() -> RejectedInput:
        return RejectedInput("decode", "audio_too_long", f"over {limits.max_seconds:g} s{claimed}")

    chunks: list[np.ndarray] = []
    n_samples = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise RejectedInput("decode", "audio_decode_error", f"no audio stream{claimed}")
            check_formats(container, limits, claimed)
            # The header's duration (if any) lets a long file be refused before decoding it.
            duration = container.duration  # in units of 1 / av.time_base seconds
            if duration is not None and duration / av.time_base > limits.max_seconds:
                raise too_long()
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(container.streams.audio[0]):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    n_samples += chunks[-1].size
                # Headers can lie or be missing, so count what is really decoded and stop early.
                if n_samples > max_samples:
                    raise too_long()
            # The resampler holds back a few samples of filter delay until it is flushed.
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
                n_samples += chunks[-1].size
    except RejectedInput:
        raise
    except Exception as exc:
        # PyAV raises FFmpegError (ValueError/OSError subclasses), EOFError, and on odd streams
        # other errors too. Hostile bytes must be a rejection, not a crash.
        raise RejectedInput(
            "decode", "audio_decode_error", f"{type(exc).__name__}: {exc}{claimed}"
        ) from exc
    if n_samples > max_samples:
        raise too_long()
    if n_samples == 0:
        raise RejectedInput("decode", "audio_decode_error", f"no samples decoded{claimed}")
    return np.concatenate(chunks).astype(np.float32, copy=False)
