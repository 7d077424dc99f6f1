"""``evaluate`` extras on a scored recording: the modality ablation and text scores per language.

- ``ablation``: incidents (correlation keys) with >= 2 modalities, labelled with all their
  evidence and with each single modality's evidence alone, on the same incidents.
- ``per_language``: text events scored alone, grouped by the message's ``lang`` field.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from models import metrics
from streams.schemas import MODALITIES

if TYPE_CHECKING:
    from models.fusion import Evidence, FusionModel
    from services.evaluate import Row


def _scores(truth: list[str], pred: list[str]) -> dict[str, Any]:
    return {
        "n": len(truth),
        "accuracy": metrics.accuracy(truth, pred),
        "macro_f1": metrics.macro_f1(truth, pred),
    }


def ablation(rows: list[Row], fusion: FusionModel) -> dict[str, Any]:
    """All modalities vs each modality alone, on incidents with two or more modalities.

    For each modality m the ``alone`` and ``all`` scores are over the multi-modal incidents
    that hold m, so the two numbers compare the same incidents.
    """
    evidence: dict[str, list[Evidence]] = {}
    votes: dict[str, Counter[str]] = {}
    for r in rows:
        if r.key is None or r.evidence is None:
            continue
        evidence.setdefault(r.key, []).append(r.evidence)
        if r.truth:
            votes.setdefault(r.key, Counter())[r.truth] += 1
    multi = sorted(
        k for k, ev in evidence.items() if k in votes and len({e.modality for e in ev}) >= 2
    )
    truth = {k: votes[k].most_common(1)[0][0] for k in multi}
    fused = {k: fusion.predict(evidence[k]).label for k in multi}
    out: dict[str, Any] = {"all": _scores([truth[k] for k in multi], [fused[k] for k in multi])}
    for m in MODALITIES:
        keys = [k for k in multi if any(e.modality == m for e in evidence[k])]
        alone = [fusion.predict([e for e in evidence[k] if e.modality == m]).label for k in keys]
        out[m] = {
            "alone": _scores([truth[k] for k in keys], alone),
            "all": _scores([truth[k] for k in keys], [fused[k] for k in keys]),
        }
    return out


def per_language(rows: list[Row], fusion: FusionModel) -> dict[str, Any]:
    """Text events scored alone, by their message's ``lang`` (events without one are skipped)."""
    by_lang: dict[str, tuple[list[str], list[str]]] = {}
    for r in rows:
        if r.lang and r.truth and r.evidence is not None and r.evidence.modality == "text":
            truth, pred = by_lang.setdefault(r.lang, ([], []))
            truth.append(r.truth)
            pred.append(fusion.predict([r.evidence]).label)
    return {lang: _scores(t, p) for lang, (t, p) in sorted(by_lang.items())}


def extra_scores(rows: list[Row], fusion: FusionModel) -> dict[str, Any]:
    """The keys ``evaluate`` adds to its metrics JSON: ``ablation`` and ``per_language``."""
    return {"ablation": ablation(rows, fusion), "per_language": per_language(rows, fusion)}
