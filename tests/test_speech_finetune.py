"""Speech fine-tuning parts on real clips and real Whisper weights: augmentation, trimmed
context, one fine-tuning step, and the shipped speech artifact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from whisper.model import Whisper

from models import audio_augment as aug
from models import finetune_speech as fs
from models import whisper_infer as wi
from models.audio import SAMPLE_RATE, decode_audio
from models.datasets import audio_table
from models.speech import ARTIFACT_DIR, SpeechConfig, SpeechEncoder, speech_config
from models.whisper_convert import load_whisper


def _band_energy(x: np.ndarray, lo: float, hi: float) -> float:
    power = np.abs(np.fft.rfft(x.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE)
    return float(power[(freqs >= lo) & (freqs <= hi)].sum() / power.sum())


def _peak_hz(x: np.ndarray) -> float:
    freqs = np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE)
    return float(freqs[np.abs(np.fft.rfft(x)).argmax()])


def _tone(hz: float, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    """Two real training clips (decoded with the services' own decoder)."""
    df = audio_table().sort("key").head(2)
    return [decode_audio(Path(p).read_bytes()) for p in df["path"]]


@pytest.fixture(scope="module")
def base() -> Whisper:
    return load_whisper()


def test_noise_kinds_and_snr() -> None:
    rng = np.random.default_rng(0)
    n = 4 * SAMPLE_RATE
    white, pink, brown = (aug.colored_noise(n, k, rng) for k in ("white", "pink", "brown"))
    for noise in (white, pink, brown):
        assert noise.shape == (n,) and noise.dtype == np.float32
        assert abs(float(np.sqrt(np.mean(noise**2))) - 1) < 1e-3
    # Share of power below 500 Hz grows from white (1/16 of the band) to pink to brown.
    low = [_band_energy(x, 0, 500) for x in (white, pink, brown)]
    assert low[0] < 0.1 < low[1] < low[2]

    speech = _tone(440, 4)
    noisy = aug.add_noise(speech, 20.0, "pink", rng)
    noise_rms = float(np.sqrt(np.mean((noisy - speech) ** 2)))
    snr = 20 * np.log10(float(np.sqrt(np.mean(speech**2))) / noise_rms)
    assert noisy.shape == speech.shape and abs(snr - 20.0) < 0.1


def test_telephone_band_limits() -> None:
    x = aug.colored_noise(2 * SAMPLE_RATE, "white", np.random.default_rng(1))
    y = aug.band_pass(x)
    assert y.shape == x.shape and y.dtype == np.float32
    assert _band_energy(y, 300, 3400) > 0.999
    assert _band_energy(x, 300, 3400) < 0.5


def test_speed_and_pitch() -> None:
    tone = _tone(440)
    fast = aug.speed(tone, 1.25)
    assert len(fast) == round(len(tone) / 1.25)
    assert abs(_peak_hz(fast) - 550) < 5
    up = aug.pitch_shift(tone, 12.0)
    assert len(up) == len(tone)
    assert abs(_peak_hz(up) - 880) < 10


@pytest.mark.parametrize("codec", ["opus", "mp3"])
def test_codec_round_trip_decodes(clips: list[np.ndarray], codec: str) -> None:
    x = clips[0]
    data = aug.encode_codec(x, codec)  # type: ignore[arg-type]
    assert 1000 < len(data) < len(x) * 2 // 4  # compressed well below 16-bit PCM
    y = aug.codec_round_trip(x, codec)  # type: ignore[arg-type]
    assert y.shape == x.shape and y.dtype == np.float32
    # Lossy but the same signal: codecs shift by a small delay, so take the best lag.
    lags = range(0, 1200, 8)
    best = max(
        float(np.corrcoef(x[: len(x) - 1200], y[lag : lag + len(x) - 1200])[0, 1]) for lag in lags
    )
    assert best > 0.8


def test_mulaw_and_random_augment(clips: list[np.ndarray]) -> None:
    x = clips[0]
    y = aug.mulaw_8k(x)
    assert y.shape == x.shape and float(np.corrcoef(x, y)[0, 1]) > 0.9
    assert _band_energy(y, 0, 4000) > 0.99  # 8 kHz sampling leaves nothing above 4 kHz
    rng = np.random.default_rng(3)
    views = [aug.random_augment(x, rng) for _ in range(4)]
    for v in views:
        assert v.dtype == np.float32 and v.ndim == 1 and np.isfinite(v).all()
        assert 0.8 * len(x) < len(v) < 1.2 * len(x)
        assert float(np.abs(v).max()) <= 1.0
    assert len({v.tobytes() for v in views}) == 4


def test_trimmed_context_shapes(base: Whisper, clips: list[np.ndarray]) -> None:
    mel = wi.log_mel(clips, base.dims.n_mels)
    assert mel.shape == (2, 80, 3000)
    frames = [wi.frames_for(len(a)) for a in clips]
    ctx = max(frames)
    with torch.inference_mode():
        trimmed = wi.encode(base, mel, ctx)
        full = wi.encode(base, mel)
    assert trimmed.shape == (2, ctx, 384) and full.shape == (2, 1500, 384)
    assert ctx == -(-max(map(len, clips)) // 320) and ctx < 1500
    # The stock encoder and this one agree on the full window.
    with torch.inference_mode():
        np.testing.assert_allclose(full.numpy(), base.encoder(mel).numpy(), atol=1e-4)
    pooled = wi.pool(trimmed, frames)
    assert pooled.shape == (2, 384) and torch.isfinite(pooled).all()


def test_one_finetuning_step_changes_adapter(clips: list[np.ndarray]) -> None:
    cfg = fs.FinetuneConfig(epochs=1, batch=2, lr=1e-2, aug_prob=1.0)
    model = load_whisper()
    two = fs.Clips(["a", "b"], clips, np.array([1, 6]), ["v", "v"], ["", ""])
    teacher = fs.teacher_targets(model, two, 8, "test-run")
    assert all(len(t) > 3 for t in teacher.tokens)
    fs.prepare(model, "lora-encdec", cfg)
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    assert before and all("lora_" in k for k in before)
    head, losses = fs.train(model, "lora-encdec", two, teacher, cfg)
    assert len(losses) == 1 and np.isfinite(losses[0]) and losses[0] > 0
    after = dict(model.named_parameters())
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    # LoRA's B starts at zero, so the first step moves B (A's gradient is still zero).
    assert any("lora_B" in k for k in changed) and any("decoder" in k for k in changed)
    assert head.weight.shape == (7, 384)


# The fine-tuned artifact shipped in the repository (served when configs/models.json names it).
SHIPPED = "speech_lora-encdec.safetensors"


def test_shipped_artifact_loads_and_serves(clips: list[np.ndarray]) -> None:
    name = speech_config().artifact or SHIPPED
    path = ARTIFACT_DIR / name
    assert path.stat().st_size <= 25 * 2**20
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["method"] in fs.METHODS and json.loads(meta["config"])["model_name"] == "tiny.en"
    model, head, _ = fs.load_artifact(path)
    assert not any("lora" in k for k in model.state_dict())  # merged for serving
    base_sd, tuned_sd = load_whisper().state_dict(), model.state_dict()
    assert base_sd.keys() == tuned_sd.keys()
    assert any(not torch.equal(base_sd[k], tuned_sd[k]) for k in base_sd)

    encoder = SpeechEncoder(config=SpeechConfig(artifact=name, context="trim"))
    assert name.removesuffix(".safetensors") in encoder.version and "-trim" in encoder.version
    emb, texts = encoder.encode(clips)
    assert emb.shape == (2, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert all(len(t.split()) >= 3 for t in texts)
    with torch.inference_mode():
        logits = head(torch.from_numpy(emb))
    assert logits.shape == (2, 7)
