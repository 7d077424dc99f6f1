"""CrisisMMD text task heads (informative; humanitarian, 5 classes) on text vectors.

Trained on the shared CrisisMMD train split, chosen on its dev split (the official test
split is kept by the project). A head is a softmax regression or a one-hidden-layer MLP,
saved as ``models/artifacts/crisismmd_<task>.safetensors`` + ``.json`` (metadata, dev scores).
The vectors come from the CrisisMMD adapter (:mod:`models.crisismmd_adapter`) when the head's
metadata names one (``encoder.artifact``), else from the served text encoder.
"""

from __future__ import annotations

import csv
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models import metrics
from models.fusion import ARTIFACT_DIR

TASKS = ("informative", "humanitarian")
# The paper's 5-class humanitarian setup (Ofli, Alam & Imran, ISCRAM 2020).
HUMANITARIAN_MERGE = {
    "injured_or_dead_people": "affected_individuals",
    "missing_or_found_people": "affected_individuals",
    "vehicle_damage": "infrastructure_and_utility_damage",
}
CLASSES = {
    "informative": ["informative", "not_informative"],
    "humanitarian": [
        "affected_individuals",
        "infrastructure_and_utility_damage",
        "not_humanitarian",
        "other_relevant_information",
        "rescue_volunteering_or_donation_effort",
    ],
}
# Tried on dev; the best mean of dev accuracy and macro-F1 is kept.
GRID: list[dict[str, Any]] = [
    {"hidden": 0, "weight_decay": wd, "balanced": bal}
    for wd in (1e-4, 1e-3, 1e-2)
    for bal in (False, True)
] + [{"hidden": 256, "weight_decay": 1e-3, "balanced": bal} for bal in (False, True)]


def truth_key(task: str) -> str:
    """The recording truth field of a task: ``crisismmd_informative`` / ``crisismmd_humanitarian``."""
    return f"crisismmd_{task}"


def merge_label(task: str, label: str) -> str:
    """The benchmark label (humanitarian: 5 classes after the paper's merge)."""
    return HUMANITARIAN_MERGE.get(label, label) if task == "humanitarian" else label


def load_split(task: str, split: str, root: Path | None = None) -> pl.DataFrame:
    """``key`` (tweet_id), ``text``, ``label`` (merged), ``event`` of one CrisisMMD split,
    one row per tweet (the files hold one row per tweet-image pair)."""
    from models.datasets import data_dir

    path = (
        (root or data_dir())
        / "text"
        / "crisismmd"
        / (f"task_{task}_text_img_agreed_lab_{split}.tsv")
    )
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    df = pl.DataFrame(
        {
            "key": [r["tweet_id"] for r in rows],
            "text": [r["tweet_text"] for r in rows],
            "label": [merge_label(task, r["label"]) for r in rows],
            "event": [r["event_name"] for r in rows],
        }
    )
    return df.unique("key", keep="first", maintain_order=True)


class TaskHead(nn.Module):
    """Softmax regression (``hidden`` = 0) or a one-hidden-layer MLP over text vectors."""

    def __init__(self, dim: int, n_classes: int, hidden: int = 0) -> None:
        super().__init__()
        self.net: nn.Module
        if hidden:
            self.net = nn.Sequential(
                nn.Dropout(0.2), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, n_classes)
            )
        else:
            self.net = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (n, C)."""
        return self.net(x)


def fit(
    x: np.ndarray, y: np.ndarray, n_classes: int, hidden: int, weight_decay: float, balanced: bool
) -> TaskHead:
    """Full-batch AdamW on cross-entropy (class-balanced weights when ``balanced``)."""
    torch.manual_seed(0)
    head = TaskHead(x.shape[1], n_classes, hidden)
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y)
    counts = np.bincount(y, minlength=n_classes).astype(np.float32)
    weight = (
        torch.from_numpy(counts.sum() / (n_classes * np.maximum(counts, 1))) if balanced else None
    )
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=weight_decay)
    head.train()
    for _ in range(300):
        loss = nn.functional.cross_entropy(head(xt), yt, weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()


@dataclass
class TaskModel:
    """A loaded task head: classes, the text encoder it expects, and the weights."""

    task: str
    classes: list[str]
    head: TaskHead
    meta: dict[str, Any]

    @classmethod
    def load(cls, task: str, folder: Path = ARTIFACT_DIR) -> TaskModel:
        """Load ``crisismmd_<task>.safetensors`` + ``.json``; FileNotFoundError says how to build it."""
        meta_path = folder / f"crisismmd_{task}.json"
        if not meta_path.exists():
            raise FileNotFoundError(
                f"{meta_path}: no CrisisMMD {task} head (build it: cityfuse train --tasks)"
            )
        meta = json.loads(meta_path.read_text())
        head = TaskHead(meta["dim"], len(meta["classes"]), meta["config"]["hidden"])
        head.load_state_dict(load_file(str(folder / f"crisismmd_{task}.safetensors")))
        return cls(task, list(meta["classes"]), head.eval(), meta)

    @property
    def encoder_artifact(self) -> str | None:
        """The adapter file the head reads vectors of (beside the head), or None: the served
        text vector."""
        enc = self.meta.get("encoder") or {}
        return str(enc["artifact"]) if enc.get("artifact") else None

    @torch.inference_mode()
    def predict(self, vectors: np.ndarray) -> list[str]:
        """Class names for (n, dim) text vectors."""
        if len(vectors) == 0:
            return []
        idx = self.head(torch.from_numpy(vectors).float()).argmax(-1)
        return [self.classes[int(i)] for i in idx]


def scores(truth: list[str], pred: list[str], classes: list[str]) -> dict[str, Any]:
    """Accuracy and macro-F1 (over the task's classes) with 95% bootstrap intervals, per class."""
    return {
        "n": len(truth),
        "accuracy": metrics.bootstrap_ci(truth, pred, "accuracy"),
        "macro_f1": metrics.bootstrap_ci(truth, pred, "macro_f1", classes),
        "per_class": metrics.per_class(truth, pred, classes),
    }


def embed(frames: list[pl.DataFrame], encoder: Any) -> dict[str, np.ndarray]:
    """Text vectors by tweet id for every tweet in ``frames``, cached per encoder version
    (the union of all task files: one tweet is embedded once)."""
    from models.embed_cache import _batched, cached

    tweets = pl.concat([f.select("key", "text") for f in frames]).unique("key").sort("key")
    texts = tweets["text"].to_list()
    data = cached(
        "crisismmd",
        encoder.version,
        tweets["key"].to_list(),
        lambda: _batched(texts, lambda b: {"text": encoder.encode(b)}, 64, "embed CrisisMMD"),
    )
    return dict(zip(tweets["key"].to_list(), data["text"], strict=True))


def encoder_rows(task: str) -> pl.DataFrame:
    """CrisisMMD train tweets the text encoder may learn from (its auxiliary loss).

    ``city_reports.csv`` holds some CrisisMMD events as groups ``crisismmd_<event>``; the
    events whose group is in the city validation or test split are left out, so that the
    encoder never sees those tweets (the task heads, trained later on frozen vectors, may).
    """
    df = load_split(task, "train")
    return df.filter(~("crisismmd_" + pl.col("event")).is_in(_city_held_groups()))


@functools.cache
def _city_held_groups() -> list[str]:
    """The city text groups in validation or test (read once per process)."""
    from models.datasets import text_table
    from models.splits import three_way

    city = text_table()
    city = city.with_columns(split=three_way(city, "text"))
    return sorted(city.filter(pl.col("split") != "train")["group"].unique().to_list())


def capped(df: pl.DataFrame, cap: int) -> pl.DataFrame:
    """At most ``cap`` rows per (event, label), a seeded sample."""
    shuffled = df.sample(fraction=1.0, shuffle=True, seed=0)
    capped = shuffled.group_by("event", "label", maintain_order=True).head(cap)
    return capped.select(df.columns).sort("key")


def all_splits() -> list[pl.DataFrame]:
    """Every shared CrisisMMD split of both tasks (train and dev; test is not shared)."""
    return [load_split(t, s) for t in TASKS for s in ("train", "dev")]


def train_task(
    task: str,
    encoder: Any,
    out_dir: Path = ARTIFACT_DIR,
    cap: int | None = None,
    dev_cap: int | None = None,
    adapter: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the grid on CrisisMMD train, choose on dev, save the chosen head + metadata.

    ``cap`` keeps at most that many train tweets per (event, label) (seeded sample) to
    bound embedding time; ``dev_cap`` likewise for dev (the reported figures then carry
    wider intervals). ``adapter`` is the metadata of the CrisisMMD adapter ``encoder`` was
    loaded from (its ``artifact`` is a file name beside the head), or None for the served
    text encoder.
    """
    t0 = time.perf_counter()
    classes = CLASSES[task]
    train, dev = load_split(task, "train"), load_split(task, "dev")
    frames = all_splits()
    caps = [cap, dev_cap] * len(TASKS)  # all_splits order: (train, dev) per task
    frames = [capped(f, c) if c else f for f, c in zip(frames, caps, strict=True)]
    if cap:
        train = capped(train, cap)
    if dev_cap:
        dev = capped(dev, dev_cap)
    vectors = embed(frames, encoder)
    x_tr = np.stack([vectors[k] for k in train["key"]])
    x_dev = np.stack([vectors[k] for k in dev["key"]])
    y_tr = np.array([classes.index(v) for v in train["label"]])
    truth = dev["label"].to_list()
    best: tuple[float, dict[str, Any], TaskHead, dict[str, Any]] | None = None
    tried = []
    for cfg in GRID:
        head = fit(x_tr, y_tr, len(classes), **cfg)
        with torch.inference_mode():
            pred = [classes[int(i)] for i in head(torch.from_numpy(x_dev).float()).argmax(-1)]
        acc = metrics.accuracy(truth, pred)
        f1 = metrics.macro_f1(truth, pred, classes)
        tried.append({**cfg, "dev_accuracy": acc, "dev_macro_f1": f1})
        if best is None or (acc + f1) / 2 > best[0]:
            best = ((acc + f1) / 2, cfg, head, {"pred": pred})
    assert best is not None
    _, cfg, head, extra = best
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"crisismmd_{task}.safetensors"
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(weights))
    meta = {
        "task": f"crisismmd-{task}",
        "kind": "MLP" if cfg["hidden"] else "softmax regression",
        "classes": classes,
        "dim": int(x_tr.shape[1]),
        "text_encoder": getattr(encoder, "version", type(encoder).__name__),
        "encoder": adapter,
        "config": cfg,
        "grid": tried,
        "train_rows": len(train),
        "train_cap_per_event_label": cap,
        "dev_cap_per_event_label": dev_cap,
        "dev": scores(truth, extra["pred"], classes),
        "trainable_params": sum(p.numel() for p in head.parameters()),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "artifact_bytes": weights.stat().st_size,
        "data": "shared/data/text/crisismmd task_*_text_img_agreed_lab_{train,dev}.tsv, "
        "one row per tweet; humanitarian merged to 5 classes",
    }
    (out_dir / f"crisismmd_{task}.json").write_text(json.dumps(meta, indent=2))
    return meta
