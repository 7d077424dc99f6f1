"""Encoder forward passes compiled by OpenVINO for the CPU (a serving backend).

Used for EfficientNet-Lite0's pooled feature and Whisper's audio encoder. EfficientNet is
mostly depthwise convolutions, which torch runs as separate memory-bound kernels; OpenVINO's
CPU plugin fuses each block with its BatchNorm and activation and runs it in bf16 on AMX
where the CPU has it (Frigate serves its CPU detectors the same way). A module is converted
in memory at service start (a few seconds), from the weights the torch path holds (LoRA
already merged), so nothing is downloaded or cached.

The conversion goes through OpenVINO's PyTorch frontend directly, not ``openvino.convert_model``:
that wrapper starts OpenVINO's usage telemetry, and a service must not phone home.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)
# OpenVINO's names for the precisions of services.speedups.
_HINT = {"fp32": "f32", "bf16": "bf16"}


def compile_module(
    module: nn.Module, example: torch.Tensor, precision: str, threads: int
) -> Callable[[np.ndarray], np.ndarray]:
    """``module`` (one float32 tensor in, one out) as an OpenVINO CPU model.

    ``example`` fixes the rank and dtype only: every dimension stays dynamic (the batch, and
    for Whisper the clip's context). Returns a function from a float32 array to the float32
    output; ``threads`` is the inference thread count (the service's ``--threads``)."""
    import openvino as ov
    from openvino.frontend import FrontEndManager
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    if precision not in _HINT:
        raise ValueError(f"openvino serving takes fp32 or bf16, not {precision!r}")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # jit's deprecation notices
        traced = torch.jit.trace(module.eval(), example)
    frontend = FrontEndManager().load_by_framework("pytorch")
    # The decoder must outlive convert(): the frontend calls back into it by reference.
    decoder = TorchScriptPythonDecoder(traced)
    model = frontend.convert(frontend.load(decoder))
    compiled = ov.Core().compile_model(
        model,
        "CPU",
        {
            "INFERENCE_NUM_THREADS": max(1, threads),
            "INFERENCE_PRECISION_HINT": _HINT[precision],
            "PERFORMANCE_HINT": "LATENCY",  # one request at a time, all threads on it
            # OpenVINO pins its threads to cores by default: two single-thread instances on
            # one machine then share core 0 (scale-out measured 1.39x instead of ~1.8x).
            "ENABLE_CPU_PINNING": False,
        },
    )
    request = compiled.create_infer_request()
    lock = threading.Lock()  # one infer request: callers on other threads take turns

    def run(batch: np.ndarray) -> np.ndarray:
        with lock:
            request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
            return np.array(request.get_output_tensor(0).data, dtype=np.float32)

    return run


def compile_or_none(
    module: nn.Module, example: torch.Tensor, precision: str, threads: int, what: str
) -> Callable[[np.ndarray], np.ndarray] | None:
    """:func:`compile_module`, or None with a warning when OpenVINO cannot compile it (for
    example on a CPU it does not support): the caller then serves ``what`` with torch."""
    try:
        return compile_module(module, example, precision, threads)
    except Exception:
        log.warning("OpenVINO could not compile the %s; torch serves it", what, exc_info=True)
        return None


@contextlib.contextmanager
def eager(encoder: Any, *compiled_forms: str) -> Iterator[None]:
    """Within the block, ``encoder``'s compiled forms (the named attributes: a TorchScript
    graph, an OpenVINO model) are set aside, so it runs as eager torch modules: torch's FLOP
    counter sees inside neither."""
    kept = {name: getattr(encoder, name) for name in compiled_forms}
    for name in compiled_forms:
        setattr(encoder, name, None)
    try:
        yield
    finally:
        for name, value in kept.items():
            setattr(encoder, name, value)
