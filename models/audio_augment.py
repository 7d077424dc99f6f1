"""In-process audio augmentation for the speech fine-tuning (numpy, torch and PyAV only).

Every function takes and returns float32 mono 16 kHz samples and never calls sox or ffmpeg
binaries, so training runs anywhere the wheels install. The chain in :func:`random_augment`
mirrors how the hotline clips were made (telephone band, µ-law, noise, Opus; data README) with
wider ranges, so an unseen voice or line looks like something seen in training.
"""

from __future__ import annotations

import io
from typing import Literal

import av
import numpy as np
import torch

from models.audio import SAMPLE_RATE, AudioLimits, decode_audio

NoiseKind = Literal["white", "pink", "brown"]
Codec = Literal["opus", "mp3"]

# Container and encoder per codec; libopus takes 16 kHz input directly, lame resamples itself.
_CODECS: dict[str, tuple[str, str]] = {"opus": ("ogg", "libopus"), "mp3": ("mp3", "libmp3lame")}


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


def colored_noise(n: int, kind: NoiseKind, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise of ``n`` samples: white (flat), pink (1/f power) or brown (1/f² power)."""
    white = rng.standard_normal(n)
    if kind != "white":
        spectrum = np.fft.rfft(white)
        freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
        freqs[0] = freqs[1] if n > 1 else 1.0  # no infinite DC gain
        exponent = 0.5 if kind == "pink" else 1.0  # amplitude ~ f^-1/2 (pink), f^-1 (brown)
        white = np.fft.irfft(spectrum / freqs**exponent, n)
    rms = _rms(white)
    return (white / rms if rms > 0 else white).astype(np.float32)


def add_noise(
    x: np.ndarray, snr_db: float, kind: NoiseKind, rng: np.random.Generator
) -> np.ndarray:
    """Mix ``kind`` noise into ``x`` at ``snr_db`` (speech RMS over noise RMS, in dB)."""
    noise = colored_noise(len(x), kind, rng) * (_rms(x) / 10 ** (snr_db / 20))
    return (x + noise).astype(np.float32)


def band_pass(x: np.ndarray, low_hz: float = 300.0, high_hz: float = 3400.0) -> np.ndarray:
    """Telephone band: zero every FFT bin outside ``[low_hz, high_hz]`` (a brick-wall filter)."""
    spectrum = np.fft.rfft(x.astype(np.float64))
    freqs = np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE)
    spectrum[(freqs < low_hz) | (freqs > high_hz)] = 0
    return np.fft.irfft(spectrum, len(x)).astype(np.float32)


def resample(x: np.ndarray, n_out: int) -> np.ndarray:
    """Linear-interpolation resampling of ``x`` onto ``n_out`` evenly spaced samples."""
    if n_out <= 0 or not len(x):
        return np.zeros(max(n_out, 0), dtype=np.float32)
    positions = np.linspace(0, len(x) - 1, n_out)
    return np.interp(positions, np.arange(len(x)), x).astype(np.float32)


def speed(x: np.ndarray, factor: float) -> np.ndarray:
    """Play ``factor`` times faster: shorter clip, pitch up by the same ratio (tape-style)."""
    return resample(x, round(len(x) / factor))


def time_stretch(x: np.ndarray, rate: float, n_fft: int = 512, hop: int = 128) -> np.ndarray:
    """Phase-vocoder time stretch: ``rate`` > 1 shortens the clip, the pitch is unchanged."""
    if len(x) < n_fft:
        return x.astype(np.float32)
    window = torch.hann_window(n_fft, dtype=torch.float64)
    spec = torch.stft(
        torch.from_numpy(x.astype(np.float64)), n_fft, hop, window=window, return_complex=True
    )
    steps = torch.arange(0, spec.shape[-1] - 1, rate, dtype=torch.float64)
    left = spec[:, steps.long()]
    right = spec[:, steps.long() + 1]
    frac = (steps - steps.floor())[None, :]
    magnitude = (1 - frac) * left.abs() + frac * right.abs()
    # Expected phase advance per hop for each bin; the deviation is wrapped to [-pi, pi].
    expected = torch.linspace(0, torch.pi * hop, spec.shape[0], dtype=torch.float64)[:, None]
    delta = right.angle() - left.angle() - expected
    delta = delta - 2 * torch.pi * torch.round(delta / (2 * torch.pi))
    phase = torch.cumsum(delta + expected, dim=-1)
    phase = torch.cat([spec[:, :1].angle(), phase[:, :-1] + spec[:, :1].angle()], dim=-1)
    out = torch.istft(
        torch.polar(magnitude, phase),
        n_fft,
        hop,
        window=window,
        length=round(len(x) / rate),
    )
    return out.numpy().astype(np.float32)


def pitch_shift(x: np.ndarray, semitones: float) -> np.ndarray:
    """Shift the pitch by ``semitones`` and keep the duration (stretch, then resample)."""
    ratio = 2 ** (semitones / 12)
    return resample(time_stretch(x, 1 / ratio), len(x))


def mulaw_8k(x: np.ndarray, mu: int = 255) -> np.ndarray:
    """G.711-style round trip: down to 8 kHz, 8-bit µ-law, back to 16 kHz."""
    narrow = np.clip(resample(band_pass(x, 0, 3900), len(x) // 2), -1, 1)
    companded = np.sign(narrow) * np.log1p(mu * np.abs(narrow)) / np.log1p(mu)
    levels = np.round((companded + 1) / 2 * mu) / mu * 2 - 1  # 256 codes
    expanded = np.sign(levels) * ((1 + mu) ** np.abs(levels) - 1) / mu
    return resample(expanded.astype(np.float32), len(x))


def encode_codec(x: np.ndarray, codec: Codec, bitrate: int = 24_000) -> bytes:
    """Encode ``x`` with ``codec`` (Opus in Ogg, or MP3) in memory; returns the file bytes."""
    fmt, encoder = _CODECS[codec]
    return encode_pyav(x, fmt, encoder, bitrate)


def encode_pyav(x: np.ndarray, fmt: str, encoder: str, bitrate: int | None = None) -> bytes:
    """16 kHz mono ``x`` as a ``fmt`` file encoded by PyAV's ``encoder`` (e.g. flac, libopus)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(encoder, rate=SAMPLE_RATE, layout="mono")
        assert isinstance(stream, av.AudioStream)
        if bitrate:
            stream.bit_rate = bitrate
        pcm = (np.clip(x, -1, 1) * 32767).astype(np.int16)[None, :]
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.rate = SAMPLE_RATE
        # encode() converts to the codec's own sample format and frame size.
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buf.getvalue()


def codec_round_trip(x: np.ndarray, codec: Codec, bitrate: int = 24_000) -> np.ndarray:
    """Encode with ``codec`` and decode again (the services' own decoder), same length as ``x``."""
    decoded = decode_audio(encode_codec(x, codec, bitrate), limits=AudioLimits(1 << 30, 600.0))
    # Codecs add priming/padding samples; keep the timeline comparable to the input.
    out = np.zeros(len(x), dtype=np.float32)
    out[: min(len(x), len(decoded))] = decoded[: len(x)]
    return out


def random_augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random training view of a clip: speed/pitch, telephone band, codec, noise, gain."""
    y = x.astype(np.float32)
    if rng.random() < 0.5:
        y = speed(y, float(rng.uniform(0.88, 1.12)))
    if rng.random() < 0.4:
        y = pitch_shift(y, float(rng.uniform(-3, 3)))
    if rng.random() < 0.5:
        y = band_pass(y, float(rng.uniform(200, 400)), float(rng.uniform(3000, 3800)))
    roll = rng.random()
    if roll < 0.3:
        y = mulaw_8k(y)
    elif roll < 0.55:
        codec: Codec = "opus" if rng.random() < 0.6 else "mp3"
        y = codec_round_trip(y, codec, int(rng.choice([16_000, 24_000, 32_000])))
    if rng.random() < 0.7:
        kind: NoiseKind = rng.choice(np.array(["white", "pink", "brown"])).item()
        y = add_noise(y, float(rng.uniform(12, 35)), kind, rng)
    peak = float(np.abs(y).max()) or 1.0
    return (y / peak * 10 ** (rng.uniform(-12, -1) / 20)).astype(np.float32)
