"""The machine's matmul peak (fp32 and int8) and FLOP counting of a served forward pass."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

# Square sizes tried; the peak is the best of them (small ones are overhead-bound).
GEMM_SIZES = (256, 512, 1024, 2048)


def _rate(fn: Any, flops: float, seconds: float) -> float:
    """Best FLOP/s of ``fn`` over repeated calls for about ``seconds``."""
    fn()  # warm-up (allocations, packing)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    return flops / best


def _int8_linear(n: int) -> Any:
    """An int8 dynamic-quantised n x n Linear (fbgemm/onednn kernels, activations quantised
    on the fly): the int8 path a served encoder can use."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
        lin = torch.nn.Sequential(torch.nn.Linear(n, n, bias=False))
        return torch.ao.quantization.quantize_dynamic(lin, {torch.nn.Linear}, dtype=torch.qint8)


def gemm_peak(seconds_per_size: float = 0.5) -> dict[str, Any]:
    """fp32 ``torch.matmul`` and int8 peaks (``torch._int_mm`` and an int8 dynamic-quantised
    Linear; the better of the two) in FLOP/s, an int8 multiply-add counting as 2 operations,
    with this process's torch thread count."""
    gen = torch.Generator().manual_seed(0)
    fp32: dict[str, float] = {}
    bf16: dict[str, float] = {}
    int_mm: dict[str, float] = {}
    qlinear: dict[str, float] = {}
    for n in GEMM_SIZES:
        flops = 2.0 * n**3
        a = torch.randn(n, n, generator=gen)
        b = torch.randn(n, n, generator=gen)
        fp32[str(n)] = _rate(lambda a=a, b=b: torch.matmul(a, b), flops, seconds_per_size)
        ha, hb = a.bfloat16(), b.bfloat16()
        bf16[str(n)] = _rate(lambda a=ha, b=hb: torch.matmul(a, b), flops, seconds_per_size)
        qa = torch.randint(-128, 127, (n, n), dtype=torch.int8, generator=gen)
        qb = torch.randint(-128, 127, (n, n), dtype=torch.int8, generator=gen)
        int_mm[str(n)] = _rate(lambda a=qa, b=qb: torch._int_mm(a, b), flops, seconds_per_size)
        q = _int8_linear(n)
        with torch.inference_mode():
            qlinear[str(n)] = _rate(lambda q=q, a=a: q(a), flops, seconds_per_size)
    return {
        "threads": torch.get_num_threads(),
        "fp32_peak_flops": max(fp32.values()),
        "int8_peak_ops": max(*int_mm.values(), *qlinear.values()),
        # bf16 (oneDNN; AMX tiles or AVX512-BF16 where the CPU has them): the peak of
        # encoders served in bf16 (configs/services.json -> serving).
        "bf16_peak_flops": max(bf16.values()),
        "fp32_by_size": fp32,
        "bf16_by_size": bf16,
        "int8_int_mm_by_size": int_mm,
        "int8_dynamic_linear_by_size": qlinear,
    }


class FlopCount:
    """Counts the FLOPs of everything torch runs inside ``with``: aten matmuls and convolutions
    (``FlopCounterMode``) plus int8 dynamic-quantised Linear layers, which it does not see."""

    def __init__(self) -> None:
        self.quantized = 0

    @property
    def total(self) -> int:
        """FLOPs counted (2 per multiply-add)."""
        return int(self._mode.get_total_flops()) + self.quantized

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...], _out: Any) -> None:
        from torch.ao.nn.quantized.dynamic import Linear as DynLinear

        if isinstance(module, DynLinear) and args:
            rows = args[0].numel() // module.in_features
            self.quantized += 2 * rows * module.in_features * module.out_features

    @contextlib.contextmanager
    def counting(self) -> Iterator[FlopCount]:
        """Count inside this block."""
        self._mode = FlopCounterMode(display=False)
        handle = torch.nn.modules.module.register_module_forward_hook(self._hook)
        try:
            with self._mode:
                yield self
        finally:
            handle.remove()


def count_flops(fn: Any) -> int:
    """FLOPs of one call of ``fn()``."""
    counter = FlopCount()
    with counter.counting():
        fn()
    return counter.total
