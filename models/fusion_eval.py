"""Scoring a fusion head on a split's pools: per modality, per language, fused incidents,
and the single-modality ablation on the same incidents, with 95% bootstrap intervals.

Used once on the test groups per shipped artifact (``models/train.py``), and for the
language breakdown on val.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from models import metrics
from models.fusion import FusionHead
from streams.taxonomy import label_names

if TYPE_CHECKING:
    from models.train import Pool, TrainConfig

# Which head inputs belong to each modality (a call is its audio and its transcript).
MODALITY_INPUTS = {"text": ("text",), "image": ("image",), "audio": ("audio", "transcript")}
LANGUAGES = ("en", "es", "it", "pt")


def scores(truth: list[str], pred: list[str], labels: list[str] | None = None) -> dict[str, Any]:
    """Accuracy and macro-F1 with 95% bootstrap intervals, and no_incident precision."""
    ni = metrics.per_class(truth, pred, ["no_incident"])["no_incident"]
    return {
        "n": len(truth),
        "accuracy": metrics.bootstrap_ci(truth, pred, "accuracy"),
        "macro_f1": metrics.bootstrap_ci(truth, pred, "macro_f1", labels),
        "no_incident_precision": ni["precision"],
    }


def _names(idx: torch.Tensor | np.ndarray) -> list[str]:
    names = label_names()
    return [names[int(i)] for i in idx.tolist()]


@torch.no_grad()
def predict(
    head: FusionHead, x: dict[str, torch.Tensor], mask: dict[str, torch.Tensor]
) -> list[str]:
    """Argmax labels (temperature does not change them)."""
    return _names(head(x, mask).argmax(-1))


@torch.no_grad()
def by_language(head: FusionHead, pool: Pool) -> dict[str, dict[str, Any]]:
    """Text scores per report language (en, es, it, pt, other), from the ``lang`` column."""
    from models.train import single_inputs

    assert pool.tags is not None
    pred = np.array(predict(head, *single_inputs(pool)), dtype=object)
    truth = np.array(_names(pool.y), dtype=object)
    groups = {lang: pool.tags == lang for lang in LANGUAGES}
    groups["other"] = ~np.isin(pool.tags, LANGUAGES)
    return {
        lang: scores(truth[sel].tolist(), pred[sel].tolist())
        for lang, sel in groups.items()
        if sel.any()
    }


@torch.no_grad()
def ablation(
    head: FusionHead, x: dict[str, torch.Tensor], mask: dict[str, torch.Tensor], y: torch.Tensor
) -> dict[str, Any]:
    """Incidents with >= 2 modalities: all modalities vs each modality alone, same incidents.

    For modality m the comparison is on the multi-modal incidents that contain m: the
    fused label with everything, and the label from m's inputs alone.
    """
    has = {
        m: torch.stack([mask[i].any(1) for i in inputs if i in mask]).any(0)
        for m, inputs in MODALITY_INPUTS.items()
        if any(i in mask for i in inputs)
    }
    multi = torch.stack(list(has.values())).sum(0) >= 2
    truth = np.array(_names(y), dtype=object)
    fused = np.array(predict(head, x, mask), dtype=object)
    out: dict[str, Any] = {"n": int(multi.sum()), "all": scores(*_pick(truth, fused, multi))}
    for m, inputs in MODALITY_INPUTS.items():
        if m not in has:
            continue
        sel = multi & has[m]
        alone_mask = {k: v & (k in inputs) for k, v in mask.items()}
        alone = np.array(predict(head, x, alone_mask), dtype=object)
        out[m] = {
            "n": int(sel.sum()),
            "alone": scores(*_pick(truth, alone, sel)),
            "all": scores(*_pick(truth, fused, sel)),
        }
    return out


def _pick(truth: np.ndarray, pred: np.ndarray, sel: torch.Tensor) -> tuple[list[str], list[str]]:
    s = sel.numpy()
    return truth[s].tolist(), pred[s].tolist()


@torch.no_grad()
def score_test(
    head: FusionHead, pools: dict[str, Pool], cfg: TrainConfig, n_fused: int = 2000
) -> dict[str, Any]:
    """The once-per-artifact test report: per modality, text by language, fused incidents
    (built from test samples, nothing dropped), the ablation, and test calibration."""
    from models.train import sample_incidents, single_inputs

    out: dict[str, Any] = {}
    for m, pool in pools.items():
        out[m] = scores(_names(pool.y), predict(head, *single_inputs(pool)))
    if "text" in pools:
        out["text_by_language"] = by_language(head, pools["text"])
    rng = np.random.default_rng(4321)
    x, mask, y = sample_incidents(pools, n_fused, rng, cfg, augment=False)
    logits = head(x, mask)
    truth, pred = _names(y), _names(logits.argmax(-1))
    out["fused_incidents"] = scores(truth, pred, label_names())
    out["fused_incidents"]["per_class"] = metrics.per_class(truth, pred, label_names())
    out["ablation"] = ablation(head, x, mask, y)
    probs = torch.softmax(logits / head.temperature, -1)
    out["calibration"] = {
        "temperature": float(head.temperature),
        "ece_fused": metrics.expected_calibration_error(
            probs.max(-1).values.numpy(), (probs.argmax(-1) == y).numpy()
        ),
    }
    return out
