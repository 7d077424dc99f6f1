"""The bench summary: rich tables on the console, and the load plot (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from streams.console import console

# The goals, checked against one run's numbers.
GOALS: dict[str, tuple[str, float, str]] = {
    "text_ratio": ("text served / naive", 5.0, ">="),
    "image_ratio": ("image served / naive", 2.0, ">="),
    "audio_realtime": ("Whisper x real time", 20.0, ">="),
    "p99_half_capacity_ms": ("end-to-end p99 at half capacity (ms)", 1000.0, "<"),
    "scale_out_ratio": ("2 instances / 1 instance", 1.7, ">="),
}


def goal_values(r: dict[str, Any]) -> dict[str, float | None]:
    """The measured value behind each goal (None when that part did not run)."""
    so = r.get("scale_out") or {}
    ratios = [v["ratio"] for v in so.get("services", {}).values() if v.get("ratio")]
    e2e = r.get("end_to_end") or {}
    return {
        "text_ratio": r["text"]["ratio"],
        "image_ratio": r["image"]["ratio"],
        "audio_realtime": r["audio"]["realtime_factor"],
        "p99_half_capacity_ms": e2e.get("p99_ms"),
        "scale_out_ratio": min(ratios) if ratios else None,
    }


def goals(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per goal: target, measured value and whether it is met."""
    out = {}
    for key, value in goal_values(r).items():
        what, target, op = GOALS[key]
        met = None if value is None else (value >= target if op == ">=" else value < target)
        out[key] = {"what": what, "target": f"{op} {target:g}", "value": value, "met": met}
    return out


def _table(title: str, columns: tuple[str, ...]) -> Table:
    """A rich table with right-aligned columns."""
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="right")
    return t


def _f(v: Any, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def print_summary(r: dict[str, Any]) -> None:
    """Readable tables of a bench JSON."""
    t = _table(
        f"encoders, naive vs served ({r['machine']['summary']})",
        (
            "encoder",
            "events",
            "naive / s",
            "served / s",
            "ratio",
            "FLOP/s (G)",
            "% fp32 peak",
            "forward alone",
            "% bf16 peak",
            "% int8 peak",
            "serving",
        ),
    )
    for name in ("text", "image", "audio"):
        v, g = r[name], r["gemm"]["encoders"].get(name, {})
        t.add_row(
            name,
            str(v["n"]),
            _f(v["naive_events_per_s"]),
            _f(v["served_events_per_s"]),
            _f(v["ratio"], ".2f") + "x",
            _f(g.get("achieved_flops", 0) / 1e9),
            _f(100 * g.get("share_of_fp32_peak", 0)),
            _f(100 * g.get("forward_share_of_fp32_peak", 0)),
            _f(100 * g.get("share_of_bf16_peak", 0)),
            _f(100 * g.get("share_of_int8_peak", 0)),
            str(g.get("serving", "-")),
        )
    console.print(t)
    c = _table(
        "serving variants (configs/services.json -> serving), each against the fp32 naive path",
        ("variant", "served / s", "ratio", "macro-F1 lost", "agreement", "in service"),
    )
    for name in ("text", "image", "audio"):
        for variant, v in r[name].get("variants", {}).items():
            c.add_row(
                variant, _f(v["served_events_per_s"]), _f(v["ratio"], ".2f") + "x",
                _f(v["guard"]["lost_points"], ".2f"), _f(v["guard"]["label_agreement"], ".3f"),
                "yes" if v["in_service"] else "",
            )  # fmt: skip
    console.print(c)
    gm = r["gemm"]
    console.print(
        f"GEMM peak ({gm['threads']} threads): fp32 {gm['fp32_peak_flops'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {gm.get('bf16_peak_flops', 0) / 1e9:.1f} GFLOP/s, "
        f"int8 {gm['int8_peak_ops'] / 1e9:.1f} GOP/s; Whisper "
        f"{r['audio']['realtime_factor']:.1f}x real time on {r['audio']['n']} calls of "
        f"{r['audio']['mean_call_seconds']:.1f} s"
    )
    q = _table(
        "quality guard: served vs fp32 reference (macro-F1 x100, each event alone)",
        ("modality", "n", "reference", "served", "lost", "agreement", "ok"),
    )
    for m, v in r["quality"]["macro_f1"].items():
        q.add_row(
            m, str(v["n"]), _f(v["reference_macro_f1"]), _f(v["served_macro_f1"]),
            _f(v["lost_points"], ".2f"), _f(v["label_agreement"], ".3f"), "yes" if v["ok"] else "[red]NO",
        )  # fmt: skip
    console.print(q)
    w = _table(
        "Whisper word error rate per voice", ("voice", "clips", "reference WER", "served WER")
    )
    for voice, v in r["quality"]["wer_per_voice"].items():
        w.add_row(voice, str(v["n"]), _f(v["reference_wer"], ".3f"), _f(v["served_wer"], ".3f"))
    console.print(w)
    e = r.get("end_to_end")
    if e:
        s = _table(
            f"end to end, mixed stream (capacity {e['capacity_events_per_s']:.1f} events/s)",
            ("offered / s", "sent", "done", "throughput / s", "p50 ms", "p95 ms", "p99 ms"),
        )
        for row in e["sweep"]:
            s.add_row(
                _f(row["offered_events_per_s"]), str(row["sent"]), str(row["done"]),
                _f(row["throughput_events_per_s"]), _f(row["p50_ms"], ".0f"),
                _f(row["p95_ms"], ".0f"), _f(row["p99_ms"], ".0f"),
            )  # fmt: skip
        console.print(s)
    so = r.get("scale_out")
    if so and so.get("services"):
        x = _table(
            f"scale-out: one consumer group, {so['partitions']} partitions, 1 torch thread each",
            ("service", "events", "1 instance / s", "2 instances / s", "ratio"),
        )
        for name, v in so["services"].items():
            x.add_row(
                name, str(v["events"]), _f(v["rate_1"]), _f(v["rate_2"]), _f(v["ratio"], ".2f")
            )
        console.print(x)
    g = _table("goals (this run)", ("goal", "target", "measured", "met"))
    for v in r["goals"].values():
        met = {True: "[green]yes", False: "[red]no", None: "-"}[v["met"]]
        g.add_row(v["what"], v["target"], _f(v["value"], ".2f"), met)
    console.print(g)


def plot_load(sweep: list[dict[str, Any]], capacity: float, path: Path) -> None:
    """Throughput and latency against offered load (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offered = [row["offered_events_per_s"] for row in sweep]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(offered, [row["throughput_events_per_s"] for row in sweep], "o-", label="achieved")
    a.plot(offered, offered, "k:", label="offered")
    a.axhline(capacity, color="grey", ls="--", label="burst capacity")
    a.set(xlabel="offered load (events/s)", ylabel="throughput (events/s)", title="throughput")
    a.legend()
    for q in ("p50_ms", "p95_ms", "p99_ms"):
        b.plot(offered, [row[q] for row in sweep], "o-", label=q[:3])
    b.axhline(1000, color="red", ls=":", label="1 s")
    b.set(xlabel="offered load (events/s)", ylabel="latency (ms)", title="send → alert latency")
    b.set_yscale("log")
    b.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(r: dict[str, Any], name: str) -> str:
    """The README's results table for a bench JSON."""
    m, e, gm = r["machine"], r.get("end_to_end") or {}, r["gemm"]
    enc = gm["encoders"]

    def share(k: str) -> str:
        fp32 = f"{100 * enc[k]['share_of_fp32_peak']:.1f}% of fp32 peak"
        if "forward_share_of_fp32_peak" in enc[k]:
            fp32 += f" (forward pass alone {100 * enc[k]['forward_share_of_fp32_peak']:.1f}%)"
        if "bf16" in str(enc[k].get("serving", "")):  # served in bf16: its own peak too
            return f"{fp32}, {100 * enc[k]['share_of_bf16_peak']:.1f}% of bf16 peak"
        return fp32

    rows = [
        (
            "text: served / naive",
            f"{r['text']['served_events_per_s']:.1f} / {r['text']['naive_events_per_s']:.1f} events/s = **{r['text']['ratio']:.2f}x** ({share('text')})",
        ),
        (
            "image: served / naive",
            f"{r['image']['served_events_per_s']:.1f} / {r['image']['naive_events_per_s']:.1f} events/s = **{r['image']['ratio']:.2f}x** ({share('image')})",
        ),
        (
            "Whisper, served, 5-s calls",
            f"**{r['audio']['realtime_factor']:.1f}x real time** (naive transcribe {r['audio']['naive_realtime_factor']:.1f}x; {share('audio')})",
        ),
        (
            "GEMM peak",
            f"fp32 {gm['fp32_peak_flops'] / 1e9:.1f} GFLOP/s, bf16 {gm.get('bf16_peak_flops', 0) / 1e9:.1f} GFLOP/s, int8 {gm['int8_peak_ops'] / 1e9:.1f} GOP/s ({gm['threads']} threads)",
        ),
        (
            "quality guard (macro-F1 lost, served vs fp32)",
            ", ".join(f"{k} {v['lost_points']:.2f}" for k, v in r["quality"]["macro_f1"].items())
            + " points",
        ),
        (
            "Whisper WER per voice (served)",
            ", ".join(
                f"{k} {v['served_wer']:.2f}" for k, v in r["quality"]["wer_per_voice"].items()
            ),
        ),
    ]
    if e:
        rows.append(
            ("end to end: capacity, mixed stream", f"{e['capacity_events_per_s']:.1f} events/s")
        )
        rows.append(
            (
                f"end to end at {e['at_fraction_of_capacity']:.2f} x capacity",
                f"p50 {e['p50_ms']:.0f} ms, p95 {e['p95_ms']:.0f} ms, **p99 {e['p99_ms']:.0f} ms**",
            )
        )
        half: dict[str, Any] = next(
            (
                x
                for x in e.get("sweep", [])
                if x["fraction_of_capacity"] == e["at_fraction_of_capacity"]
            ),
            {},
        )
        if slow := half.get("slowest"):
            rows.append(
                (
                    f"its slowest {slow['n']} events: encoder / fusion stage (ms)",
                    ", ".join(
                        f"{a:.0f} / {b:.0f}"
                        for a, b in zip(slow["encode_ms"], slow["fuse_ms"], strict=True)
                    )
                    + "; inputs "
                    + ", ".join(
                        f"{t.split('.')[1]} {n}" for t, n in sorted(slow["topics"].items())
                    ),
                )
            )
    so = (r.get("scale_out") or {}).get("services", {})
    for k, v in so.items():
        rows.append(
            (
                f"scale-out {k}, 1 -> 2 instances",
                f"{v['rate_1']:.1f} -> {v['rate_2']:.1f} events/s = **{v['ratio']:.2f}x**",
            )
        )
    head = [
        f"Measured by `cityfuse bench --out {name}` on {m['cores']} cores ({m['cpu']}), no GPU, "
        f"torch {m['torch']}; load average {m['load_average_start'][0]:.1f} at start, "
        f"{m.get('load_average_end', [0])[0]:.1f} at end.",
        "",
        "| what | figure |",
        "| --- | --- |",
    ]
    return "\n".join(head + [f"| {a} | {b} |" for a, b in rows]) + "\n"


if __name__ == "__main__":
    import json
    import sys

    print(markdown(json.loads(Path(sys.argv[1]).read_text()), sys.argv[1]))
