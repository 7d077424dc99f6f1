"""A/B of ``serving.forward_lock`` end to end: the bench's pipeline at full sizes, rounds
alternating off / on in one process, so a drifting machine hits both arms alike.

``python scripts/forward_lock_ab.py --rounds 4`` prints one JSON line per round (capacity,
p50/p95/p99 at half capacity, where the slowest 1% spent their time) and writes
``out/forward_lock_ab.json``.
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
    ap.add_argument("--out", type=Path, default=Path("out/forward_lock_ab.json"))
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    models = Models.load()
    pools = {
        topics.TEXT: text_samples(FULL.text),
        topics.FRAMES: image_samples(FULL.image),
        topics.CALLS: call_samples(FULL.audio),
    }
    rows: list[dict[str, Any]] = []
    for i in range(args.rounds):
        lock = i % 2 == 1
        defaults().serving.forward_lock = lock  # read per forward pass (services.speedups)
        r = _end_to_end(models, pools, FULL, args.out.with_name(f"forward_lock_ab-{i}.json"))
        half = min(r["sweep"], key=lambda s: abs(s["fraction_of_capacity"] - HALF))
        rows.append(
            {
                "forward_lock": lock,
                "capacity_events_per_s": r["capacity_events_per_s"],
                **{k: r[k] for k in ("p50_ms", "p95_ms", "p99_ms")},
                "slowest": half.get("slowest"),
            }
        )
        console.print_json(data=rows[-1])
    args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
