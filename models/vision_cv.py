"""Grouped k-fold cross-validation of vision fine-tuning methods over train + val.

The validation split holds 7 CCTV videos and a handful of fight-video groups, too few to
tell two methods apart (lora and top differ by 1 point on val with intervals of +-3). Here
every train and val group is held out once: each fold trains a method on the other folds
for its recipe's epochs (the last epoch is kept; the held-out fold picks nothing) and
labels its own frames with the method's classifier. The out-of-fold predictions of all
folds are scored together. Test groups are never used.

``python -m models.vision_cv --methods lora top --folds 5`` writes
``models/artifacts/vision_cv.json`` and prints a table. ``--view-study`` and ``--size-study``
read the served recipe through other frame inputs on the same folds (docs/crossfit.md,
eighth and tenth studies: ``vision_view.json``, ``vision_size.json``); ``--refit M [--size N]
[--view V]`` refits a recipe on train + val.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from models.finetune_vision import (
    DEFAULTS,
    METHODS_FILE,
    TOP_METHODS,
    Activations,
    FinetuneConfig,
    Frames,
    augmented_views,
    augmenter,
    bottom,
    embed_cached,
    load_activations,
    load_frames,
    save_artifact,
    scores,
    train_method,
    update_methods_file,
)
from models.splits import grouped_folds
from models.vision import (
    ARTIFACT_DIR,
    VIEWS,
    build_backbone,
    input_suffix,
    normalise,
    trainable_state,
)
from models.weights import REFIT_SUFFIX
from streams.console import console, progress
from streams.taxonomy import label_names

CV_FILE = "vision_cv.json"
VIEW_FILE = "vision_view.json"
SIZE_FILE = "vision_size.json"


@torch.inference_mode()
def all_views(data: Frames, acts: Activations, views: int, seed: int = 0) -> list[torch.Tensor]:
    """Stage-4 augmented views of every row (train rows from the cache, the others computed
    with the cache's own per-row seeding, so a row's views do not depend on its split)."""
    shape = (len(data.df), *acts.clean.shape[1:])
    out = [torch.zeros(shape, dtype=acts.clean.dtype) for _ in range(views)]
    tr = data.rows("train")
    for v in range(views):
        out[v][tr] = acts.views[v]
    model = build_backbone().to(memory_format=torch.channels_last)
    aug = augmenter(data.size)
    rest = data.rows("val")
    with progress() as bar:
        task = bar.add_task("stages 0-4, val views", total=len(rest))
        for i in rest:
            x = augmented_views(data, int(i), views, seed, aug)
            h = bottom(model, normalise(torch.stack(x))).half()
            for v in range(views):
                out[v][i] = h[v]
            bar.advance(task)
    return out


def recipe(method: str) -> dict[str, Any]:
    """Epochs and learning rate of the method's row in the methods file (what its artifact
    was trained with), else the module defaults."""
    path = ARTIFACT_DIR / METHODS_FILE
    row = json.loads(path.read_text()).get(method, {}) if path.exists() else {}
    cfg = row.get("config") or DEFAULTS[method]
    return {"epochs": int(cfg["epochs"]), "lr": float(cfg["lr"])}


def _prepared(
    view: str, threads: int, size: int = 224
) -> tuple[Frames, Activations, list[torch.Tensor]]:
    """Frames under ``view`` at ``size`` px, their stage-4 cache and the augmented views of
    every row."""
    torch.set_num_threads(threads)
    # keep_raw=False: the few views to compute decode their frame
    data = load_frames(keep_raw=False, view=view, size=size)
    acts = load_activations(data, DEFAULTS["lora"].get("views", 2))
    return data, acts, all_views(data, acts, len(acts.views))


def cross_validate(
    methods: list[str], folds: int = 5, threads: int = 2, view: str = "crop", size: int = 224
) -> dict[str, Any]:
    """Out-of-fold scores of each top method (see the module docstring); each method's entry
    keeps its out-of-fold label ids (``pred``, -1 for test rows) and the rows' groups."""
    data, acts, views = _prepared(view, threads, size)
    pool = data.df["split"].is_in(["train", "val"]).to_numpy()
    fold = np.full(len(data.df), -1)
    fold[pool] = grouped_folds(data.df.filter(pl.Series(pool)), folds).to_numpy()
    result: dict[str, Any] = {
        "folds": folds,
        "rows": int(pool.sum()),
        "view": view,
        "size": size,
        "methods": {},
    }
    for method in methods:
        if method not in TOP_METHODS:
            raise ValueError(f"{method}: cross-validation covers the cached methods {TOP_METHODS}")
        cfg = FinetuneConfig(method=method, threads=threads, view=view, size=size, **recipe(method))
        pred = np.full(len(data.df), -1)
        t0 = time.perf_counter()
        for f in range(folds):
            split = np.where(fold == f, "val", np.where(pool, "train", "test"))
            fd = replace(data, df=data.df.with_columns(split=pl.Series(split)))
            tr = fd.rows("train")
            fa = Activations(acts.clean, [v[tr] for v in views])
            model, _, _ = train_method(fd, cfg, fa, select_epoch=False)
            va = fd.rows("val")
            _, probs = embed_cached(model, acts.clean[va])
            pred[va] = probs.argmax(-1)
            console.print(f"{method}: fold {f + 1}/{folds} done")
        rows = np.flatnonzero(pool)
        labels = [label_names()[int(i)] for i in pred[rows]]
        result["methods"][method] = {
            "config": {"epochs": cfg.epochs, "lr": cfg.lr},
            "seconds": round(time.perf_counter() - t0, 1),
            "out_of_fold": scores(data.df[rows], labels),
            "pred": pred[rows].tolist(),
            "truth": data.y[rows].tolist(),
            "groups": data.df[rows]["group"].to_list(),
        }
    return result


def _compare(
    method: str, folds: int, threads: int, inputs: dict[str, tuple[str, int]], base: str
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Cross-validate ``method`` once per frame input (name -> (view, px)) on the same folds;
    the scores of each, and each one's macro-F1 minus ``base``'s with a 95% interval from
    resampling whole groups (videos, clips, photos)."""
    from models.metrics import grouped_difference

    runs = {
        name: cross_validate([method], folds, threads, view, size)["methods"][method]
        for name, (view, size) in inputs.items()
    }
    ref = runs[base]
    diffs = {}
    for name, run in runs.items():
        if run["groups"] != ref["groups"]:
            raise RuntimeError(f"{name} and {base} were not scored on the same rows")
        if name != base:
            diffs[name] = grouped_difference(
                np.array(ref["truth"]),
                np.array(run["pred"]),
                np.array(ref["pred"]),
                np.array(ref["groups"]),
                labels=list(range(len(label_names()))),
            )
    table = {n: {k: r[k] for k in ("config", "seconds", "out_of_fold")} for n, r in runs.items()}
    return table, diffs


def view_study(method: str = "top", folds: int = 5, threads: int = 2) -> dict[str, Any]:
    """The eighth study (docs/crossfit.md): the same recipe and folds read through each frame
    view; ``squash`` wins only if its out-of-fold macro-F1 minus crop's has a 95% interval,
    resampling whole groups, above 0."""
    table, diffs = _compare(method, folds, threads, {v: (v, 224) for v in VIEWS}, "crop")
    diff = diffs["squash"]
    return {
        "study": "frame view, docs/crossfit.md (eighth study)",
        "method": method,
        "folds": folds,
        "rows": table["crop"]["out_of_fold"]["n"],
        "views": table,
        "squash_minus_crop": diff,
        "chosen": "squash" if diff["lo"] > 0 else "crop",
    }


SIZES = (224, 256, 288)
SIZE_GUARD = 0.005  # a larger input costs more per frame: it must win by this much


def size_study(
    method: str = "top", folds: int = 5, threads: int = 2, sizes: tuple[int, ...] = SIZES
) -> dict[str, Any]:
    """The served recipe at each input size of ``sizes`` (tenth study: 224, 256, 288;
    thirteenth: 288, 320; docs/crossfit.md). The first size is the comparator: the best
    out-of-fold macro-F1 wins, a larger size only if it beats the first by ``SIZE_GUARD``."""
    base = str(sizes[0])
    table, diffs = _compare(method, folds, threads, {str(n): ("crop", n) for n in sizes}, base)
    best = max(table, key=lambda n: table[n]["out_of_fold"]["macro_f1"]["value"])
    chosen = best if best == base or diffs[best]["value"] >= SIZE_GUARD else base
    return {
        "study": "frame input size, docs/crossfit.md (tenth and thirteenth studies)",
        "method": method,
        "folds": folds,
        "rows": table[base]["out_of_fold"]["n"],
        "sizes": table,
        f"minus_{base}": diffs,
        "chosen": int(chosen),
    }


def size_file(sizes: tuple[int, ...]) -> str:
    """The study file of a size grid (the tenth study's grid keeps its old name)."""
    return SIZE_FILE if sizes == SIZES else f"vision_size-{'-'.join(map(str, sizes))}.json"


def _print_study(table: dict[str, Any], diffs: dict[str, dict[str, float]], base: str) -> None:
    for name, r in table.items():
        s, m = r["out_of_fold"], r["out_of_fold"]["macro_f1"]
        console.print(
            f"{name}: out-of-fold macro-F1 {m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}], "
            f"CCTV accident F1 {s['cctv']['traffic_accident_f1']:.3f}, "
            f"no_incident F1 {s['cctv']['no_incident_f1']:.3f}"
        )
    for name, d in diffs.items():
        console.print(
            f"{name} - {base}: {d['value']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] "
            f"({d['groups']} groups)"
        )


def refit(
    method: str = "top",
    threads: int = 2,
    out_dir: Path = ARTIFACT_DIR,
    fit_on: str = "train+val",
    view: str = "crop",
    size: int = 224,
) -> dict[str, Any]:
    """Refit ``method`` with its recipe on train + val (test untouched); save and record it.

    The recipe is the one cross-validation scored (its epochs, last epoch kept): the val
    groups hold 7 of the 19 non-test CCTV videos, real camera variety the train split lacks.
    The artifact is ``vision_<method>-tv.safetensors``; it has no val figure of its own (its
    val rows are training rows), only the recipe's out-of-fold one and a test score.
    ``fit_on`` a cross-fit fold (``models.splits.parse_fit_on``) fits the same recipe on that
    fold's rows instead, for ``models.crossfit``; it is not recorded in the methods file.
    """
    from models.splits import fit_rows, fit_suffix, is_fold

    if method not in TOP_METHODS:
        raise ValueError(f"{method}: refits cover the cached methods {', '.join(TOP_METHODS)}")
    data, acts, views = _prepared(view, threads, size)
    pool = fit_rows(data.df, "image", fit_on).to_numpy()
    fd = replace(data, df=data.df.with_columns(split=pl.Series(np.where(pool, "train", "test"))))
    tr = fd.rows("train")
    cfg = FinetuneConfig(
        method=method,
        threads=threads,
        view=view,
        size=size,
        extra={"fit_on": fit_on},
        **recipe(method),
    )
    model, history, seconds = train_method(
        fd, cfg, Activations(acts.clean, [v[tr] for v in views]), select_epoch=False
    )
    n_trainable = sum(t.numel() for t in trainable_state(model).values())
    name = method + input_suffix(view, size)
    path = save_artifact(model, cfg, out_dir, name=name + fit_suffix(fit_on))
    row = {
        "method": method,
        "refit_of": name,
        "fit_on": fit_on,
        "train_rows": len(tr),
        "artifact": path.name,
        "artifact_bytes": path.stat().st_size,
        "trainable_params": n_trainable,
        "train_seconds": round(seconds, 1),
        "threads": threads,
        "config": asdict(cfg),
        "history": history,
    }
    if not is_fold(fit_on):
        update_methods_file(name + REFIT_SUFFIX, row, out_dir)
    console.print(
        f"{name}{fit_suffix(fit_on)}: fitted on {len(tr)} {fit_on} frames, {seconds:.0f} s -> "
        f"{path.name} ({path.stat().st_size / 1e6:.2f} MB)"
    )
    return row


def main() -> None:
    """CLI: run, save ``vision_cv.json``, print one line per method (``--refit M``: refit)."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--methods", nargs="+", default=["lora", "top"])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ARTIFACT_DIR / CV_FILE)
    ap.add_argument("--refit", default=None, help="refit this method on train + val instead")
    ap.add_argument("--view", choices=VIEWS, default="crop", help="frame view of --refit")
    ap.add_argument("--size", type=int, default=224, help="input px of --refit")
    ap.add_argument("--size-study", action="store_true", help="the tenth study: input size")
    ap.add_argument(
        "--sizes", type=int, nargs="+", default=list(SIZES), help="--size-study grid, first = base"
    )
    ap.add_argument(
        "--view-study", action="store_true", help="the eighth study: crop against squash"
    )
    args = ap.parse_args()
    if args.refit:
        refit(args.refit, args.threads, view=args.view, size=args.size)
        return
    if args.view_study:
        study = view_study(folds=args.folds, threads=args.threads)
        (ARTIFACT_DIR / VIEW_FILE).write_text(json.dumps(study, indent=1) + "\n")
        _print_study(study["views"], {"squash": study["squash_minus_crop"]}, "crop")
        console.print(f"chosen: {study['chosen']}")
        return
    if args.size_study:
        sizes = tuple(args.sizes)
        study = size_study(folds=args.folds, threads=args.threads, sizes=sizes)
        (ARTIFACT_DIR / size_file(sizes)).write_text(json.dumps(study, indent=1) + "\n")
        _print_study(study["sizes"], study[f"minus_{sizes[0]}"], str(sizes[0]))
        console.print(f"chosen: {study['chosen']} px")
        return
    result = cross_validate(args.methods, args.folds, args.threads)
    for r in result["methods"].values():  # the per-row reads serve the view study only
        for key in ("pred", "truth", "groups"):
            r.pop(key)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for method, r in result["methods"].items():
        s = r["out_of_fold"]
        m = s["macro_f1"]
        console.print(
            f"{method}: out-of-fold macro-F1 {m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}] "
            f"(n={s['n']}), CCTV accident F1 {s['cctv']['traffic_accident_f1']:.3f}, "
            f"no_incident F1 {s['cctv']['no_incident_f1']:.3f}; {r['seconds']} s"
        )


if __name__ == "__main__":
    main()
