"""Speech encoder: Whisper tiny.en gives a transcript and a pooled encoder embedding per clip."""

from __future__ import annotations

import math

import numpy as np
import torch
import whisper

from models.whisper_convert import load_whisper, model_version

# The encoder emits one frame per 320 samples (20 ms): mel hop 160, then a stride-2 conv.
_SAMPLES_PER_FRAME = whisper.audio.N_SAMPLES_PER_TOKEN
# Greedy decoding sometimes loops ("by by by ..."); uncapped, one such clip holds the whole batch
# for 224 decoder steps. Speech rarely tops ~6 tokens/s (this data set: at most 5), so cap at 10/s.
_MAX_TOKENS_PER_SECOND = 10


class SpeechEncoder:
    """Whisper on CPU, offline: one batched encoder pass per call, greedy English decoding."""

    def __init__(self, model_name: str = "tiny.en") -> None:
        self.model = load_whisper(model_name)
        self.name = f"whisper-{model_name}"
        self.version = model_version(model_name)
        self.dim: int = self.model.dims.n_audio_state
        self._options = whisper.DecodingOptions(language="en", fp16=False, without_timestamps=True)

    @torch.inference_mode()
    def encode(self, audios: list[np.ndarray]) -> tuple[np.ndarray, list[str]]:
        """Embed and transcribe 16 kHz mono float32 clips (each at most 30 s; longer is cut).

        Returns ``(embeddings, transcripts)``: (n, dim) float32 unit vectors, the mean of the
        encoder frames that cover real audio, and the stripped greedy transcript of each clip.
        """
        if not audios:
            return np.zeros((0, self.dim), dtype=np.float32), []
        # Mel per clip, not on the stacked batch: log_mel_spectrogram normalises by the global
        # maximum, which would couple the clips of a batch.
        mel = torch.stack(
            [
                whisper.log_mel_spectrogram(
                    whisper.pad_or_trim(np.asarray(a, dtype=np.float32)),
                    self.model.dims.n_mels,
                )
                for a in audios
            ]
        )
        features = self.model.encoder(mel)  # (n, 1500, dim)
        # Frames past the clip only encode padding; averaging them would wash out short clips.
        n_frames = [
            min(max(1, math.ceil(len(a) / _SAMPLES_PER_FRAME)), features.shape[1]) for a in audios
        ]
        pooled = torch.stack([f[:n].mean(0) for f, n in zip(features, n_frames, strict=True)])
        embeddings = torch.nn.functional.normalize(pooled, dim=-1).numpy().astype(np.float32)
        seconds = min(max(map(len, audios)), whisper.audio.N_SAMPLES) / whisper.audio.SAMPLE_RATE
        max_tokens = min(
            math.ceil(seconds * _MAX_TOKENS_PER_SECOND) + 8, self.model.dims.n_text_ctx // 2
        )
        # decode() skips its own encoder pass when given features of shape (n, n_audio_ctx, dim).
        results = whisper.decode(self.model, features, self._options, sample_len=max_tokens)
        return embeddings, [r.text.strip() for r in results]
