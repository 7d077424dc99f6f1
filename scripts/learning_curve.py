"""Learning gain and forgetting of ``cityfuse learn`` (models/continual.py), measured.

A held-out crisis event in Spanish or Italian (a "test" event of models.splits.three_way,
never trained on) stands in for a new city event the head does poorly on. Operators give
feedback on k = 10, 30, 100 of its reports (each report is a one-event incident; the
verdict is its true label); accuracy is scored on the OTHER reports of that event (the
same held-out reports for every k), and on the original validation groups (every
modality alone, and synthetic fused incidents) before and after. Repeated over seeds
(which reports get feedback), mean and range reported; also k=100 without distillation.

Usage: ``python scripts/learning_curve.py [--event NAME] [--seeds 3] [--out out/learning_curve.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.continual import Example, LearnConfig, update_head  # noqa: E402
from models.fusion import FusionHead, FusionModel  # noqa: E402
from models.train import (  # noqa: E402
    Pool,
    TrainConfig,
    cap_rows,
    load_pools,
    sample_incidents,
    single_inputs,
)
from streams.console import console  # noqa: E402
from streams.taxonomy import label_names  # noqa: E402

CANDIDATES = ("2016_ecuador_earthquake", "2014_genoa_marche_floods")
KS = (10, 30, 100)
HELD_FOR_FEEDBACK = max(KS)


@torch.no_grad()
def accuracy(head: FusionHead, pool: Pool) -> float:
    """Each sample as a one-event incident."""
    x, mask = single_inputs(pool)
    return float((head(x, mask).argmax(-1).numpy() == pool.y).mean())


@torch.no_grad()
def old_scores(head: FusionHead, val: dict[str, Pool]) -> dict[str, float]:
    """Validation accuracy per modality, over all validation samples, and fused incidents."""
    out = {m: accuracy(head, p) for m, p in val.items()}
    n = {m: len(p.y) for m, p in val.items()}
    out["all_samples"] = sum(out[m] * n[m] for m in n) / sum(n.values())
    x, mask, y = sample_incidents(val, 2000, np.random.default_rng(1234), TrainConfig(), False)
    out["fused_incidents"] = float((head(x, mask).argmax(-1) == y).float().mean())
    return out


def event_pool(text_cap: int | None) -> dict[str, Pool]:
    """Text pools of the candidate events (the same cached embeddings as training's: the
    same table, capped the same way; test events are never capped)."""
    import polars as pl

    from models.datasets import text_table
    from models.embed_cache import text_embeddings
    from models.splits import three_way
    from models.text import TextEncoder

    names = label_names()
    tdf = text_table()
    tdf = tdf.with_columns(three_way(tdf, "text"))
    if text_cap:
        tdf = cap_rows(tdf, text_cap)
    emb = text_embeddings(tdf, TextEncoder())["text"]
    y = np.array([names.index(v) for v in tdf["label"]], dtype=np.int64)
    out = {}
    for ev in CANDIDATES:
        sel = (tdf["group"] == ev).to_numpy()
        if sel.any():
            out[ev] = Pool(
                {"text": emb[sel]}, y[sel], tdf.filter(pl.Series(sel))["lang"].to_numpy()
            )
    return out


def run(event: str | None, seeds: int, cfg: LearnConfig, text_cap: int | None) -> dict[str, Any]:
    torch.set_num_threads(1)
    pools, _ = load_pools(text_cap=text_cap)
    train, val = pools["train"], pools["val"]
    base = FusionModel.load()
    events = event_pool(text_cap)
    base_acc = {ev: accuracy(base.head, p) for ev, p in events.items()}
    console.print(f"shipped head {base.version} on candidate events: {base_acc}")
    if event is None:  # the one the head does worst on
        event = min(base_acc, key=lambda e: base_acc[e])
    target = events[event]
    if len(target.y) < HELD_FOR_FEEDBACK + 30:
        raise SystemExit(f"{event}: {len(target.y)} reports, too few for k={HELD_FOR_FEEDBACK}")
    old_before = old_scores(base.head, val)
    runs: list[dict[str, Any]] = []
    variants = [(k, cfg.distill) for k in KS] + [(HELD_FOR_FEEDBACK, 0.0)]
    for seed in range(seeds):
        perm = np.random.default_rng(100 + seed).permutation(len(target.y))
        scored = target.subset(np.isin(np.arange(len(target.y)), perm[HELD_FOR_FEEDBACK:]))
        before = accuracy(base.head, scored)
        for k, distill in variants:
            examples = [
                Example({"text": target.x["text"][i : i + 1]}, int(target.y[i])) for i in perm[:k]
            ]
            run_cfg = LearnConfig(**{**cfg.__dict__, "distill": distill, "seed": seed})
            head = update_head(base.head, examples, train, run_cfg, show_progress=False)
            old_after = old_scores(head, val)
            row = {
                "seed": seed,
                "k": k,
                "distill": distill,
                "event_before": before,
                "event_after": accuracy(head, scored),
                "old_before": old_before,
                "old_after": old_after,
            }
            runs.append(row)
            console.print(
                f"seed {seed} k={k} distill={distill}: event {before:.3f} -> "
                f"{row['event_after']:.3f}; val all {old_before['all_samples']:.3f} -> "
                f"{old_after['all_samples']:.3f}, fused {old_before['fused_incidents']:.3f} -> "
                f"{old_after['fused_incidents']:.3f}"
            )
    return {
        "event": event,
        "event_reports": len(target.y),
        "scored_reports": len(target.y) - HELD_FOR_FEEDBACK,
        "shipped_head": base.version,
        "config": cfg.__dict__,
        "text_cap": text_cap,
        "rehearsal_modalities": sorted(train),
        "candidates_before": base_acc,
        "runs": runs,
    }


def summarise(res: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"learning from feedback on {res['event']} ({res['scored_reports']} scored)")
    for c in ("k", "distill", "event before", "event after", "gain", "val all Δ", "val fused Δ"):
        t.add_column(c)
    keys = sorted({(r["k"], r["distill"]) for r in res["runs"]}, key=lambda x: (-x[1], x[0]))
    for k, d in keys:
        rs = [r for r in res["runs"] if r["k"] == k and r["distill"] == d]
        gain = [100 * (r["event_after"] - r["event_before"]) for r in rs]
        d_all = [100 * (r["old_after"]["all_samples"] - r["old_before"]["all_samples"]) for r in rs]
        d_fused = [
            100 * (r["old_after"]["fused_incidents"] - r["old_before"]["fused_incidents"])
            for r in rs
        ]
        t.add_row(
            str(k),
            str(d),
            f"{np.mean([r['event_before'] for r in rs]):.3f}",
            f"{np.mean([r['event_after'] for r in rs]):.3f}",
            f"{np.mean(gain):+.1f} pts [{min(gain):+.1f}, {max(gain):+.1f}]",
            f"{np.mean(d_all):+.2f} pts [{min(d_all):+.2f}, {max(d_all):+.2f}]",
            f"{np.mean(d_fused):+.2f} pts [{min(d_fused):+.2f}, {max(d_fused):+.2f}]",
        )
    console.print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--event", default=None, choices=CANDIDATES)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=LearnConfig.steps)
    ap.add_argument(
        "--text-cap", type=int, default=None, help="As `cityfuse train --text-cap` (same cache)."
    )
    ap.add_argument(
        "--no-audio",
        action="store_true",
        help="Rehearse and score text and image only (when the call embeddings are not cached).",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "learning_curve.json")
    args = ap.parse_args()
    res = run(
        args.event, args.seeds, LearnConfig(steps=args.steps), args.text_cap, not args.no_audio
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    summarise(res)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
