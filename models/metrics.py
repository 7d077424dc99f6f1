"""Classification metrics over label names (numpy only), shared by training and evaluation."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def accuracy(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    """Fraction of exact matches (0.0 for no rows)."""
    if not y_true:
        return 0.0
    return float(np.mean([t == p for t, p in zip(y_true, y_pred, strict=True)]))


def per_class(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support per label."""
    out: dict[str, dict[str, float]] = {}
    for lab in labels:
        tp = sum(t == lab and p == lab for t, p in zip(y_true, y_pred, strict=True))
        fp = sum(t != lab and p == lab for t, p in zip(y_true, y_pred, strict=True))
        fn = sum(t == lab and p != lab for t, p in zip(y_true, y_pred, strict=True))
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        out[lab] = {"precision": prec, "recall": rec, "f1": f1, "support": tp + fn}
    return out


def macro_f1(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str] | None = None
) -> float:
    """Mean F1 over ``labels`` (default: the labels present in the ground truth)."""
    labs = sorted(set(y_true)) if labels is None else list(labels)
    if not labs:
        return 0.0
    table = per_class(y_true, y_pred, labs)
    return float(np.mean([table[lab]["f1"] for lab in labs]))


def confusion(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Counts, rows = truth, columns = prediction, in ``labels`` order."""
    index = {lab: i for i, lab in enumerate(labels)}
    mat = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(y_true, y_pred, strict=True):
        if t in index and p in index:
            mat[index[t], index[p]] += 1
    return mat


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, bins: int = 10
) -> float:
    """ECE: weighted mean gap between confidence and accuracy over equal-width bins."""
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        sel = (confidence > lo) & (confidence <= hi)
        if sel.any():
            ece += sel.mean() * abs(confidence[sel].mean() - correct[sel].mean())
    return float(ece)


def plot_confusion(mat: np.ndarray, labels: Sequence[str], path: Path, title: str) -> None:
    """Write a confusion-matrix PNG (rows = truth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(mat, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title(title)
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            if mat[i, j]:
                ax.text(
                    j,
                    i,
                    str(mat[i, j]),
                    ha="center",
                    va="center",
                    color="white" if mat[i, j] > mat.max() / 2 else "black",
                )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bootstrap_ci(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    metric: str = "macro_f1",
    labels: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Point estimate and 95% percentile-bootstrap interval of ``accuracy`` or ``macro_f1``.

    Rows are resampled with replacement (``n_boot`` times, fixed ``seed``). Macro-F1 is
    over ``labels`` or, by default, the labels present in the full ground truth, so every
    resample averages the same classes.
    """
    t = np.asarray(y_true, dtype=object)
    p = np.asarray(y_pred, dtype=object)
    labs = sorted(set(t.tolist())) if labels is None else list(labels)

    def value(tt: np.ndarray, pp: np.ndarray) -> float:
        if metric == "accuracy":
            return float(np.mean(tt == pp)) if len(tt) else 0.0
        return macro_f1_array(tt, pp, labs)

    point = value(t, p)
    if len(t) == 0:
        return {"value": point, "lo": point, "hi": point, "n": 0}
    rng = np.random.default_rng(seed)
    draws = [value(t[i], p[i]) for i in rng.integers(0, len(t), (n_boot, len(t)))]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return {"value": point, "lo": float(lo), "hi": float(hi), "n": len(t)}


def macro_f1_array(t: np.ndarray, p: np.ndarray, labels: Sequence[object]) -> float:
    """Vectorised macro-F1 over ``labels`` (bootstraps call it a thousand times)."""
    f1s = []
    for lab in labels:
        tp = float(np.sum((t == lab) & (p == lab)))
        fp = float(np.sum((t != lab) & (p == lab)))
        fn = float(np.sum((t == lab) & (p != lab)))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(f1s)) if f1s else 0.0


def precision_lower_bound(
    truth: np.ndarray, pred: np.ndarray, label: object, n_boot: int = 1000, q: float = 5.0
) -> float:
    """The ``q``-th percentile of ``label``'s precision over bootstrap resamples of the rows
    (seeded): how surely a precision bar is cleared, not just its point estimate."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(truth), size=(n_boot, len(truth)))
    said = pred[idx] == label
    right = said & (truth[idx] == label)
    prec = right.sum(1) / np.maximum(said.sum(1), 1)
    return float(np.percentile(prec, q))


def grouped_difference(
    y: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    groups: np.ndarray,
    labels: Sequence[object] | None = None,
    n_boot: int = 1000,
) -> dict[str, float]:
    """Macro-F1 of predictions ``a`` minus that of ``b`` (over ``labels``, by default those in
    ``y``), with a 95% interval from resampling whole groups (events): rows of one event are
    not independent draws."""
    labs = sorted(set(y.tolist())) if labels is None else list(labels)
    rows_of = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    rng = np.random.default_rng(0)
    diffs = []
    for _ in range(n_boot):
        idx = np.concatenate([rows_of[i] for i in rng.integers(0, len(rows_of), len(rows_of))])
        diffs.append(macro_f1_array(y[idx], a[idx], labs) - macro_f1_array(y[idx], b[idx], labs))
    point = macro_f1_array(y, a, labs) - macro_f1_array(y, b, labs)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"value": float(point), "lo": float(lo), "hi": float(hi), "groups": len(rows_of)}


def record_test(doc: dict[str, Any], result: dict[str, Any], key: str) -> dict[str, Any]:
    """``doc`` with ``result`` as its ``test`` entry. A test entry of another model (its
    ``key`` differs) moves to ``earlier_tests``: every look at test stays on record."""
    old = doc.get("test")
    if old and old.get(key) != result.get(key):
        doc = {**doc, "earlier_tests": [*doc.get("earlier_tests", []), old]}
    return {**doc, "test": result}
