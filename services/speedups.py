"""Serving-path speed-ups the encoder services apply (measured by ``cityfuse bench``).

* ``decode_all``: validation and bounded decoding of a micro-batch on a small thread pool.
  JPEG/PNG decoding (Pillow) and audio decoding (PyAV) release the GIL, so records decode in
  parallel instead of one after another before the forward pass.
* ``int8_text``: int8 dynamic quantisation of the Linear layers of the text view's torch
  encoders (MiniLM, or the fine-tuned e5), served only when the bench's macro-F1 guard
  (served vs fp32 reference) holds; ``TEXT_INT8`` is the switch.
"""

from __future__ import annotations

import os
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
# Off: on this machine int8 MiniLM cut the text view's time but moved its vectors
# (min cosine 0.87 to fp32 on validation reports); see docs/performance.md.
TEXT_INT8 = False

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


def int8_linears(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with its Linear layers int8 dynamic-quantised (weights int8, activations
    quantised per batch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
        return torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)


def int8_text(encoder: Any) -> Any:
    """Quantise the text view's torch encoders in place (once); ``version`` says ``+int8``."""
    if getattr(encoder, "_int8", False):
        return encoder
    minilm = getattr(encoder, "minilm", None)
    if minilm is not None:
        minilm.model = int8_linears(minilm.model)
    finetuned = getattr(encoder, "finetuned", None)
    if finetuned is not None:
        finetuned.model = int8_linears(finetuned.model)
    encoder.version = f"{encoder.version}+int8"
    encoder._int8 = True
    return encoder
