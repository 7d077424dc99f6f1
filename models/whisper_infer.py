"""Fast Whisper inference pieces: log-mel, trimmed-context encoder, greedy kv-cache decoding, int8.

openai-whisper's own ``encoder`` and ``decode`` insist on the fixed 30-second window (1,500
encoder frames). A 5-second call then costs six times the encoder work it needs, so this module
encodes only ``ceil(samples / 320)`` frames (as whisper.cpp's ``audio_ctx``) and runs a small
greedy loop on those features. A stock model does not know when to stop on a short context;
the fine-tuned adapters in ``models/artifacts/speech_*`` (``models.finetune_speech``) fix that.
"""

from __future__ import annotations

import math
import re
from typing import TypeVar

import numpy as np
import torch
import whisper
from torch import nn
from whisper.model import Whisper
from whisper.tokenizer import Tokenizer, get_tokenizer

M = TypeVar("M", bound=nn.Module)
N_FULL_CTX = whisper.audio.N_FRAMES // 2  # 1500 encoder frames = 30 s
_SAMPLES_PER_FRAME = whisper.audio.N_SAMPLES_PER_TOKEN  # 320 samples = 20 ms per encoder frame
# Greedy decoding sometimes loops ("by by by ..."); uncapped, one such clip holds the whole batch.
# Speech rarely tops ~6 tokens/s (this data set: at most 5), so cap at 10/s plus a margin.
MAX_TOKENS_PER_SECOND = 10


def frames_for(n_samples: int) -> int:
    """Encoder frames that cover ``n_samples`` of audio (at least 1, at most 1,500)."""
    return min(max(1, math.ceil(n_samples / _SAMPLES_PER_FRAME)), N_FULL_CTX)


def log_mel(audios: list[np.ndarray], n_mels: int) -> torch.Tensor:
    """(n, n_mels, 3000) log-mel of each clip padded/cut to 30 s, exactly as whisper computes it.

    Per clip, not on a stacked batch: whisper normalises by the clip's global maximum, which
    would otherwise couple the clips of a batch.
    """
    return torch.stack(
        [
            whisper.log_mel_spectrogram(
                whisper.pad_or_trim(np.asarray(a, dtype=np.float32)), n_mels
            )
            for a in audios
        ]
    )


def encode(model: Whisper, mel: torch.Tensor, n_ctx: int = N_FULL_CTX) -> torch.Tensor:
    """Encoder output over the first ``n_ctx`` frames only: (n, n_ctx, d).

    Same layers as ``AudioEncoder.forward``, with the positional embedding sliced instead of
    asserting the full 1,500 frames. ``n_ctx = 1500`` gives the stock result.
    """
    enc = model.encoder
    x = mel[:, :, : 2 * n_ctx]
    x = nn.functional.gelu(enc.conv1(x))
    x = nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
    x = x + enc.positional_embedding[: x.shape[1]].to(x.dtype)
    for block in enc.blocks:
        x = block(x)
    return enc.ln_post(x)


def pool(features: torch.Tensor, n_frames: list[int]) -> torch.Tensor:
    """Mean of each clip's real frames (padding frames would wash out short clips): (n, d)."""
    return torch.stack([f[:n].mean(0) for f, n in zip(features, n_frames, strict=True)])


def english_tokenizer(model: Whisper) -> Tokenizer:
    """The tokenizer matching ``model`` (offline tiktoken files ship with openai-whisper)."""
    return get_tokenizer(model.is_multilingual, num_languages=model.num_languages, language="en")


def prompt(tokenizer: Tokenizer) -> list[int]:
    """Start of transcript, English, transcribe, no timestamps (as ``whisper.decode`` sends)."""
    return list(tokenizer.sot_sequence_including_notimestamps)


def suppressed(tokenizer: Tokenizer) -> list[int]:
    """Tokens whisper's default ``suppress_tokens="-1"`` never lets greedy decoding emit."""
    special = [tokenizer.transcribe, tokenizer.translate, tokenizer.sot, tokenizer.sot_prev]
    special.append(tokenizer.sot_lm)
    if tokenizer.no_speech is not None:
        special.append(tokenizer.no_speech)
    return sorted(set(tokenizer.non_speech_tokens) | set(special))


class OutputProjection(nn.Module):
    """The decoder's tied token projection as an ``nn.Linear`` so it can be int8-quantised.

    For a 51,864-token vocabulary this matmul is most of the work of each decoding step.
    """

    def __init__(self, model: Whisper) -> None:
        super().__init__()
        weight = model.decoder.token_embedding.weight
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.linear.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@torch.inference_mode()
def greedy_decode(
    model: Whisper,
    features: torch.Tensor,
    tokenizer: Tokenizer,
    max_tokens: int,
    projection: nn.Module | None = None,
) -> list[list[int]]:
    """Greedy tokens for each row of ``features`` (n, ctx, d), with a kv cache and a token cap.

    Same filters as ``whisper.decode`` with temperature 0: the default suppressed tokens, and
    no blank or end-of-text as the first token. Stops when every row has emitted end-of-text.
    """
    n = features.shape[0]
    projection = projection if projection is not None else OutputProjection(model)
    start = prompt(tokenizer)
    tokens = torch.tensor([start] * n, dtype=torch.long)
    blocked = torch.tensor(suppressed(tokenizer), dtype=torch.long)
    first_blocked = torch.tensor([*tokenizer.encode(" "), tokenizer.eot], dtype=torch.long)
    dec = model.decoder
    cache, hooks = model.install_kv_cache_hooks()
    out: list[list[int]] = [[] for _ in range(n)]
    done = torch.zeros(n, dtype=torch.bool)
    try:
        step_input = tokens
        for step in range(max_tokens):
            offset = next(iter(cache.values())).shape[1] if cache else 0
            x = dec.token_embedding(step_input)
            x = x + dec.positional_embedding[offset : offset + step_input.shape[1]]
            for block in dec.blocks:
                x = block(x, features, mask=dec.mask, kv_cache=cache)
            logits = projection(dec.ln(x[:, -1])).float()
            logits[:, blocked] = -torch.inf
            if step == 0:
                logits[:, first_blocked] = -torch.inf
            nxt = logits.argmax(-1)
            nxt[done] = tokenizer.eot
            for i in torch.nonzero(~done).flatten().tolist():
                if int(nxt[i]) != tokenizer.eot:
                    out[i].append(int(nxt[i]))
            done |= nxt == tokenizer.eot
            if bool(done.all()):
                break
            step_input = nxt[:, None]
    finally:
        for hook in hooks:
            hook.remove()
    return out


def max_tokens_for(n_samples: int) -> int:
    """Token cap for a clip of ``n_samples``: 10 tokens per second plus 8, within the text context."""
    seconds = min(n_samples, whisper.audio.N_SAMPLES) / whisper.audio.SAMPLE_RATE
    return min(math.ceil(seconds * MAX_TOKENS_PER_SECOND) + 8, 224)


def plain_linears(module: nn.Module) -> nn.Module:
    """Replace whisper's ``Linear`` subclass by ``nn.Linear`` (same tensors) in place.

    ``quantize_dynamic`` matches module types exactly, so the subclass would stay fp32.
    """
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and type(child) is not nn.Linear:
            plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            plain.weight = child.weight
            if child.bias is not None:
                plain.bias = child.bias
            setattr(module, name, plain)
        else:
            plain_linears(child)
    return module


def quantize_int8(module: M, projection: nn.Module) -> tuple[M, nn.Module]:
    """int8 dynamic quantisation of every Linear of ``module`` and of the output projection.

    Activations are quantised per call over the whole batch, so results can shift slightly
    with the batch's content: used for the decoder only, never for the embedding encoder.
    """
    from torch.ao.quantization import quantize_dynamic

    plain_linears(module)
    qmodule = quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8)
    qproj = quantize_dynamic(projection, {nn.Linear}, dtype=torch.qint8)
    return qmodule, qproj


_FILLERS = {"uh", "um", "er", "ah"}


def words(text: str) -> list[str]:
    """Lowercase words without punctuation or fillers, as the data README scores WER."""
    found = (w.replace("'", "") for w in re.findall(r"[a-z0-9']+", text.lower()))
    return [w for w in found if w and w not in _FILLERS]


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edit distance in words, reference word count) between two texts."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1], len(ref)
