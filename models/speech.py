"""Speech encoder: Whisper tiny.en gives a transcript and a pooled encoder embedding per clip.

The variant comes from the ``audio`` key of ``configs/models.json``:

- ``artifact``: a fine-tuned method from ``models/artifacts/speech_*.safetensors`` (LoRA merged
  into the base weights at load time), or absent for the frozen base model;
- ``context``: ``"trim"`` encodes only the clip's own length (rounded up to a 0.5 s bucket),
  ``"full"`` pads every clip to Whisper's 30-second window;
- ``int8_decoder``: int8 dynamic quantisation of the decoder's Linear layers and its output
  projection (the encoder, which makes the embedding, stays fp32).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models import whisper_infer as wi
from models.whisper_convert import load_whisper, model_version
from streams.taxonomy import CONFIG_DIR

ARTIFACT_DIR = Path(__file__).resolve().parent / "artifacts"
# Trimmed contexts are rounded up to 25 frames (0.5 s): a clip's context depends only on its
# own length, so batching never changes its result, and equal buckets share one forward pass.
# Training pads by 0-50 random frames, so this padding is inside what the model has seen.
_BUCKET_FRAMES = 25


@dataclass(frozen=True)
class SpeechConfig:
    """The served speech variant (``configs/models.json`` → ``audio``)."""

    encoder: str = "whisper-tiny.en-frozen"
    model_name: str = "tiny.en"
    artifact: str | None = None
    context: str = "full"
    int8_decoder: bool = False


def speech_config(path: Path = CONFIG_DIR / "models.json") -> SpeechConfig:
    """Read the ``audio`` entry of the model selection (unknown keys are an error)."""
    raw = dict(json.loads(path.read_text(encoding="utf-8")).get("audio", {}))
    return SpeechConfig(**raw)


def call_version(speech_version: str, text_version: str) -> str:
    """The encoder version a call's Embedding carries: Whisper's and the transcript's text
    encoder's (both shape its vectors; the fusion head admits only what it trained on)."""
    return f"{speech_version}+{text_version}"


class _Encoder(nn.Module):
    """Whisper's encoder over the whole mel it is given (already cut to the clip's context),
    as one module for tracing: the positional embedding is sliced by the input's length."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return wi.encode(self.model, mel, wi.N_FULL_CTX)


class SpeechEncoder:
    """Whisper on CPU, offline: bucketed encoder passes, greedy English decoding with a kv cache."""

    def __init__(self, model_name: str | None = None, config: SpeechConfig | None = None) -> None:
        cfg = config or (SpeechConfig(model_name=model_name) if model_name else speech_config())
        self.config = cfg
        version = model_version(cfg.model_name)
        if cfg.artifact:
            from models.finetune_speech import load_artifact

            path = ARTIFACT_DIR / cfg.artifact
            self.model, _, _ = load_artifact(path)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
            version += f"+{path.stem}-{digest}"
        else:
            self.model = load_whisper(cfg.model_name)
        self.model.requires_grad_(False)
        self.projection: nn.Module = wi.OutputProjection(self.model)
        if cfg.int8_decoder:
            self.model.decoder, self.projection = wi.quantize_int8(
                self.model.decoder, self.projection
            )
            version += "-int8dec"
        if cfg.context == "trim":
            version += "-trim"
        elif cfg.context != "full":
            raise ValueError(f"audio context must be 'trim' or 'full', not {cfg.context!r}")
        self.name = f"whisper-{cfg.model_name}"
        self.version = version
        self.dim: int = self.model.dims.n_audio_state
        self.tokenizer = wi.english_tokenizer(self.model)
        # The encoder's serving precision (services.speedups.serve_speech; fp32 as loaded):
        # bf16 runs the encoder under CPU autocast, features come back fp32.
        self.precision = "fp32"
        self.serving: str | None = None
        # Whisper's encoder compiled by OpenVINO (models/openvino_cpu.py), when served so.
        self.compiled: Callable[[np.ndarray], np.ndarray] | None = None

    def compile_encoder(self, precision: str, threads: int) -> None:
        """Serve the audio encoder (the call embedding and the decoder's input) through
        OpenVINO in ``precision``; the greedy decoder stays in torch."""
        from models.openvino_cpu import compile_or_none

        example = torch.zeros(2, self.model.dims.n_mels, 2 * 2 * _BUCKET_FRAMES)
        self.compiled = compile_or_none(
            _Encoder(self.model), example, precision, threads, "Whisper encoder"
        )

    def eager(self) -> contextlib.AbstractContextManager[None]:
        """Within the block, the encoder runs as eager torch modules (for the FLOP counter)."""
        from models.openvino_cpu import eager

        return eager(self, "compiled")

    def context_for(self, n_samples: int) -> int:
        """Encoder frames a clip of ``n_samples`` is encoded with."""
        if self.config.context == "full":
            return wi.N_FULL_CTX
        frames = wi.frames_for(n_samples)
        return min(-(-frames // _BUCKET_FRAMES) * _BUCKET_FRAMES, wi.N_FULL_CTX)

    @torch.inference_mode()
    def encode(self, audios: list[np.ndarray]) -> tuple[np.ndarray, list[str]]:
        """Embed and transcribe 16 kHz mono float32 clips (each at most 30 s; longer is cut).

        Returns ``(embeddings, transcripts)``: (n, dim) float32 unit vectors, the mean of the
        encoder frames that cover real audio, and the stripped greedy transcript of each clip.
        """
        from services.speedups import autocast

        embeddings = np.zeros((len(audios), self.dim), dtype=np.float32)
        transcripts = [""] * len(audios)
        groups: dict[int, list[int]] = {}
        for i, a in enumerate(audios):
            groups.setdefault(self.context_for(len(a)), []).append(i)
        for ctx, rows in groups.items():
            part = [np.asarray(audios[i], dtype=np.float32) for i in rows]
            mel = wi.log_mel(part, self.model.dims.n_mels)
            if self.compiled is not None:
                feats = torch.from_numpy(self.compiled(mel[:, :, : 2 * ctx].numpy()))
            else:
                with autocast(self.precision):
                    feats = wi.encode(self.model, mel, ctx).float()
            pooled = wi.pool(feats, [wi.frames_for(len(a)) for a in part])
            embeddings[rows] = nn.functional.normalize(pooled, dim=-1).numpy()
            cap = wi.max_tokens_for(max(map(len, part)))
            tokens = wi.greedy_decode(self.model, feats, self.tokenizer, cap, self.projection)
            for i, t in zip(rows, tokens, strict=True):
                transcripts[i] = self.tokenizer.decode(t).strip()
        return embeddings, transcripts
