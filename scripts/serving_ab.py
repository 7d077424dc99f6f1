"""A/B of one serving setting end to end: the bench's pipeline at full sizes, rounds
alternating the configured setting (A) and the change (B) in one process, so a drifting
machine hits both arms alike.

``python scripts/serving_ab.py --forward-lock --rounds 4`` (B: ``serving.forward_lock`` on)
or ``--speech-batch N`` (B: the speech service's micro-batch at most N calls) prints one
JSON line per round (capacity, p50/p95/p99 at half capacity, where the slowest 1% spent
their time) and writes ``out/serving_ab.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.bench import FULL, HALF, _end_to_end
from benchmarks.samples import call_samples, image_samples, text_samples
from services.runtime import Models
from streams import topics
from streams.console import console
from streams.settings import defaults


def main() -> None:
    """Run the rounds and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=4)
    arm = ap.add_mutually_exclusive_group(required=True)
    arm.add_argument("--forward-lock", action="store_true", help="B: forward_lock on")
    arm.add_argument("--speech-batch", type=int, help="B: speech micro-batch of at most N")
    ap.add_argument("--out", type=Path, default=Path("out/serving_ab.json"))
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    models = Models.load()
    pools = {
        topics.TEXT: text_samples(FULL.text),
        topics.FRAMES: image_samples(FULL.image),
        topics.CALLS: call_samples(FULL.audio),
    }
    conf = defaults()  # read when a service starts; each round starts a new pipeline
    a_lock, a_batch = conf.serving.forward_lock, conf.batch["speech"].max
    rows: list[dict[str, Any]] = []
    for i in range(args.rounds):
        b = i % 2 == 1
        conf.serving.forward_lock = args.forward_lock if b else a_lock
        conf.batch["speech"].max = (args.speech_batch or a_batch) if b else a_batch
        r = _end_to_end(models, pools, FULL, args.out.with_name(f"{args.out.stem}-{i}.json"))
        half = min(r["sweep"], key=lambda s: abs(s["fraction_of_capacity"] - HALF))
        rows.append(
            {
                "arm": "B" if b else "A",
                "forward_lock": conf.serving.forward_lock,
                "speech_batch": conf.batch["speech"].max,
                "capacity_events_per_s": r["capacity_events_per_s"],
                **{k: r[k] for k in ("p50_ms", "p95_ms", "p99_ms")},
                "slowest": half.get("slowest"),
            }
        )
        console.print_json(data=rows[-1])
    args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
