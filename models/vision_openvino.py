"""EfficientNet-Lite0's pooled feature compiled by OpenVINO for the CPU (a serving backend).

EfficientNet is mostly depthwise convolutions, which torch runs as separate memory-bound
kernels. OpenVINO's CPU plugin fuses each depthwise/pointwise block with its BatchNorm and
ReLU6 and runs it in bf16 on AMX where the CPU has it; Frigate serves its CPU detectors the
same way. The model is converted in memory at service start (a few seconds), from the
same weights the torch path holds, so nothing is downloaded or cached.

The conversion goes through OpenVINO's PyTorch frontend directly, not ``openvino.convert_model``:
that wrapper starts OpenVINO's usage telemetry, and a service must not phone home.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

# OpenVINO's names for the precisions of services.speedups.
_HINT = {"fp32": "f32", "bf16": "bf16"}


def compile_pooled(
    module: nn.Module, precision: str, threads: int, size: int
) -> Callable[[np.ndarray], np.ndarray]:
    """``module`` (frames (n, 3, size, size) -> features (n, d)) as an OpenVINO CPU model.

    Returns a function from a float32 batch to its float32 features. The batch size stays
    dynamic; ``threads`` is the inference thread count (the service's ``--threads``)."""
    import openvino as ov
    from openvino.frontend import FrontEndManager
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    if precision not in _HINT:
        raise ValueError(f"openvino vision serving takes fp32 or bf16, not {precision!r}")
    example = torch.zeros(2, 3, size, size)
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
