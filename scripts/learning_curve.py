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
    sample_incidents,
    single_inputs,
)
from streams.console import console, progress  # noqa: E402
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


def build_pools(event: str, text_cap: int) -> tuple[dict[str, dict[str, Pool]], Pool]:
    """Train/val pools (text capped per (event, label) as ``train --text-cap``; frames all)
    and the target event's reports. Embeds only these texts (cached under out/), so the
    measurement does not need the whole text table embedded."""
    import polars as pl

    from models.datasets import image_table, text_table
    from models.embed_cache import image_embeddings
    from models.splits import three_way
    from models.text import TextEncoder
    from models.vision import VisionEncoder

    names = label_names()
    tdf = text_table()
    tdf = tdf.with_columns(three_way(tdf, "text"))
    rest = cap_rows(tdf.filter(pl.col("split") != "test"), text_cap)
    target = tdf.filter(pl.col("group") == event)
    if target.is_empty():
        raise SystemExit(f"no reports of event {event}")
    rows = pl.concat([rest, target])
    enc = TextEncoder()
    cache = ROOT / "out" / f"learning_curve_text_{enc.version}_{text_cap}_{event}.npz"
    keys = rows["key"].to_list()
    if cache.exists() and list(np.load(cache)["keys"]) == keys:
        emb = np.load(cache)["text"]
    else:
        texts = rows["text"].to_list()
        parts = []
        with progress() as bar:
            task = bar.add_task("embed texts", total=len(texts))
            for i in range(0, len(texts), 64):
                parts.append(enc.encode(texts[i : i + 64]))
                bar.advance(task, len(texts[i : i + 64]))
        emb = np.concatenate(parts)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, text=emb, keys=np.array(keys))
    y = np.array([names.index(v) for v in rows["label"]], dtype=np.int64)
    split = rows["split"].to_numpy()
    is_target = (rows["group"] == event).to_numpy()
    idf = image_table()
    img = image_embeddings(idf, VisionEncoder())["image"]
    iy = np.array([names.index(v) for v in idf["label"]], dtype=np.int64)
    isplit = three_way(idf, "image").to_numpy()
    pools = {
        s: {
            "text": Pool({"text": emb[(split == s) & ~is_target]}, y[(split == s) & ~is_target]),
            "image": Pool({"image": img[isplit == s]}, iy[isplit == s]),
        }
        for s in ("train", "val")
    }
    return pools, Pool({"text": emb[is_target]}, y[is_target])


def run(event: str, seeds: int, cfg: LearnConfig, text_cap: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    pools, target = build_pools(event, text_cap)
    train, val = pools["train"], pools["val"]
    base = FusionModel.load()
    console.print(f"shipped head {base.version}; {event}: {len(target.y)} reports")
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
        "note": "calls not rehearsed or scored (their embeddings were not cached here)",
        "val_rows": {m: len(p.y) for m, p in val.items()},
        "train_rows": {m: len(p.y) for m, p in train.items()},
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
    ap.add_argument("--event", default=CANDIDATES[1], choices=CANDIDATES)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=LearnConfig.steps)
    ap.add_argument(
        "--text-cap", type=int, default=20, help="Train/val texts per (event, label), as train."
    )
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "learning_curve.json")
    args = ap.parse_args()
    res = run(args.event, args.seeds, LearnConfig(steps=args.steps), args.text_cap)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    summarise(res)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
