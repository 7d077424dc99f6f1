"""``cityfuse bench --tiny`` writes every key the issue asks for (no timing assertions)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from benchmarks.bench import TINY, run_bench


def test_tiny_bench_writes_keys(models: Any, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run_bench(out, TINY, scale_out=False, models=models)
    r = json.loads(out.read_text())
    for name in ("text", "image"):
        assert r[name]["ratio"] > 0
        assert r[name]["naive_events_per_s"] > 0 and r[name]["served_events_per_s"] > 0
        assert r[name]["rejected"] == 0
    assert r["audio"]["realtime_factor"] > 0
    e2e = r["end_to_end"]
    assert e2e["capacity_events_per_s"] > 0
    assert e2e["burst"]["done"] == e2e["burst"]["sent"]
    assert 0 < e2e["p50_ms"] <= e2e["p95_ms"] <= e2e["p99_ms"]
    # The slowest events split into encoder and fusion time, which add up to their latency.
    slow = e2e["burst"]["slowest"]
    assert slow["n"] >= 3 and sum(slow["topics"].values()) == slow["n"]
    total = [a + b for a, b in zip(slow["encode_ms"], slow["fuse_ms"], strict=True)]
    assert all(a >= b - 0.2 for a, b in itertools.pairwise(total))  # slowest first (rounded)
    assert all(a > 0 for a in slow["encode_ms"])
    assert Path(e2e["plot"]).stat().st_size > 0
    gemm = r["gemm"]
    assert gemm["fp32_peak_flops"] > 0 and gemm["int8_peak_ops"] > 0
    for name in ("text", "image", "audio"):
        assert gemm["encoders"][name]["flops_per_event"] > 0
        assert gemm["encoders"][name]["share_of_fp32_peak"] > 0
    q = r["quality"]
    assert set(q["macro_f1"]) == {"text", "image", "audio"}
    assert q["wer_per_voice"] and all(v["served_wer"] >= 0 for v in q["wer_per_voice"].values())
    assert set(r["goals"]) >= {
        "text_ratio",
        "image_ratio",
        "audio_realtime",
        "p99_half_capacity_ms",
    }
    assert r["scale_out"] is None


def test_wer_counts_edits() -> None:
    from benchmarks.wer import edit_distance, wer

    assert edit_distance(["a", "b", "c"], ["a", "x", "c", "d"]) == 2
    assert wer([("There is a fire, uh, on Main Street", "there is a fire on main street")]) == 0.0
    assert wer([("fire on main street", "fire in main")]) == 0.5


def test_serving_variants_are_set_once() -> None:
    """``services.speedups``: precision names, and an encoder is prepared once (a service
    keeps an encoder a bench candidate prepared; another precision is an error)."""
    from types import SimpleNamespace

    import pytest
    import torch

    from services import speedups

    assert speedups.resolve("fp32") == "fp32"
    assert speedups.resolve("auto") in ("fp32", "bf16")
    with pytest.raises(ValueError):
        speedups.resolve("fp8")
    bert = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    part = SimpleNamespace(model=SimpleNamespace(encoder=bert), precision="fp32")
    enc = SimpleNamespace(finetuned=part, minilm=None, serving=None)
    x = torch.randn(3, 8)
    want = bert(x)
    assert speedups.serve_text(enc, "bf16") is enc
    assert enc.serving == "text-bf16" and part.precision == "bf16"
    assert bert[0].weight.dtype == torch.bfloat16 and bert[1].weight.dtype == torch.float32
    with speedups.autocast("bf16"):
        got = bert(x).float()
    assert torch.allclose(got, want, atol=0.1)
    assert speedups.serve_text(enc) is enc  # kept as prepared
    with pytest.raises(ValueError):
        speedups.serve_text(enc, "int8")
