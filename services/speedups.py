"""Serving-path speed-ups the encoder services apply (each measured by ``cityfuse bench``).

One place for every switch; the choices live in ``configs/services.json`` → ``serving``
(:class:`streams.settings.Serving`), and ``bench.json`` → ``serving`` records what ran.

* ``decode_all``: validation and bounded decoding of a micro-batch on a small thread pool.
  JPEG/PNG decoding (Pillow) and audio decoding (PyAV) release the GIL, so records decode in
  parallel instead of one after another before the forward pass.
* ``serve_text``: the text view's torch encoders (fine-tuned e5, or MiniLM of the frozen
  views) in bf16 (bf16 Linear weights under CPU autocast: the matmuls run on AMX /
  AVX512-BF16, LayerNorm, softmax, pooling and L2 stay fp32) or int8 (dynamic int8 Linear
  layers). Texts are tokenised once per batch, sorted by token count and padded per chunk
  (``models.text_e5ft``).
* ``serve_speech``: Whisper's encoder (the call embedding and the decoder's cross-attention
  input) in bf16 autocast; the decoder stays as selected (int8 in ``configs/models.json``).
* ``forward_pass``: optionally one encoder forward pass at a time per process.
* ``serve_vision``: EfficientNet-Lite0 in bf16 autocast, optionally as a frozen TorchScript
  graph (BatchNorm folded into the convolutions, oneDNN fusions), run a few frames at a time.

The encoder ``version`` strings are not changed: they name the weights the fusion head was
trained on (its door compares them exactly); the precision is a serving choice held to the
bench's guard (served macro-F1 within 1 point of the fp32 reference).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from streams.errors import RejectedInput

R = TypeVar("R")
T = TypeVar("T")

# One worker per core: decoding is CPU work, more threads would only queue.
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))
PRECISIONS = ("fp32", "bf16", "int8")

_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")
    return _pool


def decode_all(read: Callable[[T], R], items: Sequence[T]) -> list[R | RejectedInput]:
    """``read`` of every item, in order, on the decode pool; a RejectedInput is returned in
    place of its result (anything else raised by ``read`` propagates)."""

    def safe(item: T) -> R | RejectedInput:
        try:
            return read(item)
        except RejectedInput as e:
            return e

    if len(items) < 2 or DECODE_THREADS < 2:
        return [safe(i) for i in items]
    return list(_executor().map(safe, items))


# --- precision ---------------------------------------------------------------------------


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX tiles or AVX512-BF16); elsewhere
    oneDNN emulates bf16 and it is slower than fp32."""
    cpu: Any = torch.cpu
    try:
        return bool(cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported())
    except AttributeError:  # an older torch without the probes
        return False


def resolve(precision: str) -> str:
    """``auto`` -> ``bf16`` on a CPU with native bf16, else ``fp32``; others unchanged."""
    if precision == "auto":
        return "bf16" if native_bf16() else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: one of auto, {', '.join(PRECISIONS)}")
    return precision


def int8_linears(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with its Linear layers int8 dynamic-quantised (weights int8, activations
    quantised per batch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
        return torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)


def bf16_linears(module: torch.nn.Module) -> torch.nn.Module:
    """Cast the weights and biases of every Linear layer to bf16 in place (run the module
    under :func:`autocast`: inputs are cast per call, the weights once here)."""
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            m.to(torch.bfloat16)
    return module


def with_precision(module: torch.nn.Module, precision: str) -> torch.nn.Module:
    """``module`` prepared for ``precision`` (fp32: unchanged; bf16: bf16 Linear weights;
    int8: dynamic int8 Linear layers)."""
    if precision == "bf16":
        return bf16_linears(module)
    if precision == "int8":
        return int8_linears(module)
    return module


def autocast(precision: str) -> contextlib.AbstractContextManager[Any]:
    """CPU bf16 autocast for ``bf16``; a no-op otherwise."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


_FORWARD = threading.Lock()


def forward_pass() -> contextlib.AbstractContextManager[Any]:
    """The process-wide forward-pass lock when ``serving.forward_lock`` is on, else a no-op."""
    return _FORWARD if _serving().forward_lock else contextlib.nullcontext()


# --- per service ---------------------------------------------------------------------------


def _serving() -> Any:
    from streams.settings import defaults

    return defaults().serving


def _text_model(model: Any, precision: str) -> Any:
    """A transformers BERT in ``precision``; in bf16 with the eager attention, which beats
    the fused SDPA kernel on these short, padded sequences (+7% on the served path)."""
    if precision == "bf16" and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    return with_precision(model, precision)


def serve_text(encoder: Any, precision: str | None = None) -> Any:
    """Put the text view's torch encoders in the served precision (``configs/services.json``
    → ``serving.text_precision`` unless given), once; ``encoder.serving`` names it.

    An encoder already prepared is returned as it is (a service given an encoder served
    explicitly, e.g. a bench candidate, keeps it); asking for another precision is an error."""
    done = getattr(encoder, "serving", None)
    if done is not None and precision is None:
        return encoder
    want = resolve(precision or _serving().text_precision)
    if done is not None:
        if done != f"text-{want}":
            raise ValueError(f"text encoder already served as {done}, not {want}")
        return encoder
    finetuned = getattr(encoder, "finetuned", None)
    if finetuned is not None:  # the BERT encoder only: the label head is not on this path
        finetuned.model.encoder = _text_model(finetuned.model.encoder, want)
        finetuned.precision = want
    minilm = getattr(encoder, "minilm", None)
    if minilm is not None:
        minilm.model = _text_model(minilm.model, want)
        minilm.precision = want
    encoder.serving = f"text-{want}"
    return encoder


def serve_vision(
    encoder: Any,
    precision: str | None = None,
    jit: bool | None = None,
    chunk: int | None = None,
    backend: str | None = None,
) -> Any:
    """Put EfficientNet in the served precision / graph form (``serving.image_*`` unless
    given), once; as :func:`serve_text`, an encoder already prepared is kept."""
    done = getattr(encoder, "serving", None)
    asked = (precision, jit, chunk, backend)
    if done is not None and all(a is None for a in asked):
        return encoder
    cfg = _serving()
    want = resolve(precision or cfg.image_precision)
    use_backend = backend or cfg.image_backend
    # TorchScript is torch's form, and the fallback should OpenVINO fail to compile.
    use_jit = cfg.image_jit if jit is None else jit
    size = chunk or cfg.image_chunk
    if done is not None:
        if not (done.startswith(f"image-{want}") and done.endswith(f"-chunk{size}")):
            raise ValueError(f"vision encoder already served as {done}, not {want}/{size}")
        return encoder
    encoder.set_serving(want, use_jit, size, use_backend)
    # Named by what runs: "-openvino" only if OpenVINO compiled it, "-jit" only if the
    # TorchScript graph was built.
    ran = "-openvino" if encoder.compiled is not None else "-jit" if encoder.graph else ""
    encoder.serving = f"image-{want}{ran}-chunk{size}"
    return encoder


def serve_speech(encoder: Any, precision: str | None = None, backend: str | None = None) -> Any:
    """Run Whisper's encoder in the served precision and backend (``serving.audio_encoder_*``
    unless given), once. The decoder keeps its model-selection form (``configs/models.json``
    → ``audio.int8_decoder``); int8 dynamic Linear layers take fp32 inputs, so autocast
    covers the encoder only."""
    done = getattr(encoder, "serving", None)
    if done is not None and precision is None and backend is None:
        return encoder
    cfg = _serving()
    want = resolve(precision or cfg.audio_encoder_precision)
    use_backend = backend or cfg.audio_encoder_backend
    if want == "int8":
        raise ValueError("the Whisper encoder makes the call embedding: fp32 or bf16 only")
    if use_backend not in ("torch", "openvino"):
        raise ValueError(f"audio encoder backend must be 'torch' or 'openvino', not {backend!r}")
    if done is not None:
        if not done.startswith(f"audio-encoder-{want}"):
            raise ValueError(f"speech encoder already served as {done}, not {want}")
        return encoder
    encoder.precision = want
    if use_backend == "openvino":
        encoder.compile_encoder(want, torch.get_num_threads())
    # Named by what runs (torch, should OpenVINO fail to compile).
    encoder.serving = f"audio-encoder-{want}{'-openvino' if encoder.compiled else ''}"
    return encoder


def describe(**encoders: Any) -> dict[str, Any]:
    """What the served encoders run (for ``bench.json``): the ``serving`` config and, per
    modality, the variant (``serving``) or, for encoders without one, their version."""
    out: dict[str, Any] = {"config": _serving().model_dump(), "native_bf16": native_bf16()}
    for modality, e in encoders.items():
        out[modality] = getattr(e, "serving", None) or getattr(e, "version", "as loaded")
    return out
