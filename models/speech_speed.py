"""Speed and word error rate of Whisper serving variants, side by side in one process.

Real-time factor = seconds of call audio / wall seconds for embedding + transcript, on
5-second calls (validation clips cut or padded to 5 s) in batches. Word error rate per voice is
measured on the full validation clips with the same variant, so a faster variant that hears
less is visible next to its speed. Run: ``python -m models.speech_speed [artifact ...]``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from rich.table import Table

from models.audio import SAMPLE_RATE
from models.finetune_speech import ARTIFACT_DIR, load_split, refresh_table, wer_by_voice
from models.speech import SpeechConfig, SpeechEncoder
from streams.console import console, progress


def five_second_calls(audios: list[np.ndarray], n: int, seconds: float = 5.0) -> list[np.ndarray]:
    """``n`` calls of exactly ``seconds``: clips cut, or zero-padded when shorter."""
    size = int(seconds * SAMPLE_RATE)
    out = []
    for i in range(n):
        a = audios[i % len(audios)][:size]
        out.append(np.pad(a, (0, size - len(a))).astype(np.float32))
    return out


def measure(
    config: SpeechConfig, threads: int = 2, batch: int = 8, n_calls: int = 16
) -> dict[str, Any]:
    """Real-time factor on 5-s calls and val WER per voice for one serving variant."""
    torch.set_num_threads(threads)
    val = load_split("val")
    encoder = SpeechEncoder(config=config)
    calls = five_second_calls(val.audio, n_calls)
    encoder.encode(calls[:2])  # warm-up: first-call allocations and lazy init
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(0, len(calls), batch):
        encoder.encode(calls[i : i + batch])
    wall = time.perf_counter() - start
    # CPU seconds of this process (all threads): on a machine shared with other jobs the wall
    # clock measures the scheduler too; audio seconds per CPU second is the per-core rate.
    cpu = time.process_time() - cpu_start
    transcripts: list[str] = []
    for i in range(0, len(val.audio), batch):
        transcripts += encoder.encode(val.audio[i : i + batch])[1]
    return {
        "config": asdict(config),
        "version": encoder.version,
        "threads": threads,
        "batch": batch,
        "calls": n_calls,
        "realtime_factor": round(n_calls * 5.0 / wall, 2),
        "s_per_5s_call": round(wall / n_calls, 4),
        "audio_s_per_cpu_s": round(n_calls * 5.0 / cpu, 2),
        "val_wer": wer_by_voice(val, transcripts),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }


def variants(artifact: str | None) -> list[tuple[str, SpeechConfig]]:
    """The serving variants compared: frozen full/trimmed, then the artifact trimmed ± int8."""
    out = [
        ("frozen, full 30 s context", SpeechConfig()),
        ("frozen, trimmed context", SpeechConfig(context="trim")),
        ("frozen, trimmed, int8 decoder", SpeechConfig(context="trim", int8_decoder=True)),
    ]
    if artifact:
        out += [
            (f"{artifact}, trimmed", SpeechConfig(artifact=artifact, context="trim")),
            (
                f"{artifact}, trimmed, int8 decoder",
                SpeechConfig(artifact=artifact, context="trim", int8_decoder=True),
            ),
        ]
    return out


def main(argv: list[str]) -> None:
    """Measure every variant (artifacts named on the command line) and write speech_methods.json."""
    artifacts: list[str | None] = list(argv) or [None]
    rows: dict[str, Any] = {}
    todo = [v for a in artifacts for v in variants(a)]
    todo = list(dict(todo).items())  # the frozen variants once
    with progress() as bar:
        task = bar.add_task("speech speed", total=len(todo))
        for name, cfg in todo:
            rows[name] = measure(cfg)
            bar.advance(task)
    table = Table(title="Whisper serving variants (5-s calls, 2 threads, batch 8)")
    for col in ("variant", "x real time", "s / 5-s call", "audio s / CPU s", "val WER by voice"):
        table.add_column(col)
    for name, r in rows.items():
        wer = ", ".join(f"{k} {v:.3f}" for k, v in r["val_wer"].items())
        table.add_row(
            name,
            f"{r['realtime_factor']:.1f}",
            f"{r['s_per_5s_call']:.3f}",
            f"{r['audio_s_per_cpu_s']:.1f}",
            wer,
        )
    console.print(table)
    # Beside the method rows, under "serving" (the one speech results file).
    out = ARTIFACT_DIR / "speech_methods.json"
    table_json = json.loads(out.read_text()) if out.is_file() else {}
    table_json.setdefault("serving", {}).update(rows)
    out.write_text(json.dumps(table_json, indent=1, sort_keys=True) + "\n")
    refresh_table(ARTIFACT_DIR)
    console.print(f"wrote {out.name} (serving)")


if __name__ == "__main__":
    main(sys.argv[1:])
