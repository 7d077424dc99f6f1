"""Zero- and few-shot incident types: a new label from its description plus k examples,
without retraining any encoder or the fusion head.

Per head input, the new label gets a prototype in that input's vector space: the unit mean
of the k example vectors blended with the description's text vector (text and transcript
inputs only; images and Whisper vectors have no description, so they need k > 0). Its
threshold is the 95th percentile of the cosine between known-label training vectors and
the prototype, a choice that needs no example of the new label. The extra logit is the best
known logit plus ``scale`` x (mean over present inputs of cosine - threshold): the new label
wins when the evidence is more like it than nearly all known-label reports are.

``measure`` holds a label out of the head's training (default ``fire``), adds it back with
k = 0, 4, 16 examples from its train rows, and scores the val groups.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from models import metrics
from models.fusion import ARTIFACT_DIR, FusionHead
from streams.console import console
from streams.taxonomy import label_names, labels

if TYPE_CHECKING:
    from models.train import Pool, TrainConfig

TEXT_SPACE = ("text", "transcript")  # inputs in the text encoder's space
QUANTILE = 0.95
SCALE = 20.0
BLEND = 4.0  # the description weighs as much as 4 examples


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def prototype(description: np.ndarray | None, examples: np.ndarray | None) -> np.ndarray | None:
    """Unit blend of the description vector (weight BLEND) and the k example vectors (weight k)."""
    k = 0 if examples is None else len(examples)
    total = np.zeros(0)
    if description is not None:
        total = BLEND * _unit(description)
    if examples is not None and k:
        mean = k * _unit(examples.mean(0))
        total = mean if total.size == 0 else total + mean
    return _unit(total) if total.size else None


@dataclass
class NewLabel:
    """A label added after training: per input a prototype and a cosine threshold."""

    name: str
    prototypes: dict[str, np.ndarray]
    thresholds: dict[str, float]
    scale: float = SCALE

    @torch.no_grad()
    def extra_logit(
        self, known: torch.Tensor, x: dict[str, torch.Tensor], mask: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """(B,) logit of the new label, given the head's known-label logits (B, L)."""
        total = torch.zeros(known.shape[0])
        count = torch.zeros(known.shape[0])
        for name, proto in self.prototypes.items():
            if name not in x:
                continue
            m = mask[name].float()
            cos = x[name] @ torch.from_numpy(proto).float() / x[name].norm(dim=-1).clamp(min=1e-9)
            mean = (cos * m).sum(1) / m.sum(1).clamp(min=1.0)
            present = mask[name].any(1).float()
            total += present * (mean - self.thresholds[name])
            count += present
        score = torch.where(count > 0, total / count.clamp(min=1.0), torch.full_like(total, -1e4))
        return known.max(-1).values + self.scale * score


def add_label(
    name: str,
    description: np.ndarray | None,
    examples: dict[str, np.ndarray],
    known: dict[str, np.ndarray],
) -> NewLabel:
    """Build a new label from a description vector (text space) and per-input example vectors.

    ``known`` holds known-label vectors per input (training data), used only to place each
    prototype's threshold.
    """
    protos: dict[str, np.ndarray] = {}
    thresholds: dict[str, float] = {}
    for inp, vecs in known.items():
        proto = prototype(description if inp in TEXT_SPACE else None, examples.get(inp))
        if proto is None:
            continue
        cos = (vecs @ proto) / np.maximum(np.linalg.norm(vecs, axis=1), 1e-9)
        protos[inp] = proto.astype(np.float32)
        thresholds[inp] = float(np.quantile(cos, QUANTILE))
    return NewLabel(name, protos, thresholds)


@torch.no_grad()
def predict_with(
    head: FusionHead,
    new: NewLabel,
    replace_index: int,
    x: dict[str, torch.Tensor],
    mask: dict[str, torch.Tensor],
) -> list[str]:
    """Labels with the new label's logit in column ``replace_index`` (the held-out label)."""
    logits = head(x, mask)
    keep = [i for i in range(logits.shape[1]) if i != replace_index]
    known = logits[:, keep]
    logits[:, replace_index] = new.extra_logit(known, x, mask)
    names = label_names()
    return [names[int(i)] for i in logits.argmax(-1)]


def measure(
    pools: dict[str, dict[str, Pool]],
    cfg: TrainConfig,
    prompts: np.ndarray,
    held_out: str = "fire",
    ks: tuple[int, ...] = (0, 4, 16),
    draws: int = 3,
) -> dict[str, Any]:
    """Hold ``held_out`` out of training, add it back from k examples, score val per modality."""
    from models.train import sample_incidents, single_inputs, train_head

    names = label_names()
    c = names.index(held_out)
    train = {m: p.subset(p.y != c) for m, p in pools["train"].items()}
    head = train_head(train, cfg, prompts)
    description = prompts[c]
    known = {inp: arr for p in train.values() for inp, arr in p.x.items()}
    rows: list[dict[str, Any]] = []
    val = pools["val"]
    fused = sample_incidents(val, 2000, np.random.default_rng(1234), cfg, augment=False)
    sets = {m: (*single_inputs(p), torch.from_numpy(p.y)) for m, p in val.items()}
    sets["fused_incidents"] = fused
    for k in ks:
        preds: dict[str, list[list[str]]] = {m: [] for m in sets}
        for d in range(draws if k else 1):
            rng = np.random.default_rng(100 + d)
            examples: dict[str, np.ndarray] = {}
            for p in pools["train"].values():
                idx = p.by_label[c]
                if k and len(idx):
                    pick = rng.choice(idx, min(k, len(idx)), replace=False)
                    examples |= {inp: arr[pick] for inp, arr in p.x.items()}
            new = add_label(held_out, description, examples, known)
            for m, (x, mask, _) in sets.items():
                preds[m].append(predict_with(head, new, c, x, mask))
        for m, (_, _, y) in sets.items():
            truth = [names[int(i)] for i in y]
            f1s = [metrics.macro_f1(truth, p, names) for p in preds[m]]
            label_f1 = [metrics.per_class(truth, p, [held_out])[held_out]["f1"] for p in preds[m]]
            best = int(np.argsort(f1s)[len(f1s) // 2])  # the median draw is reported
            ci = metrics.bootstrap_ci(truth, preds[m][best], "macro_f1", names)
            rows.append(
                {
                    "modality": m,
                    "k": k,
                    "draws": len(f1s),
                    "macro_f1": ci,
                    "label_f1": label_f1[best],
                    "n": len(truth),
                }
            )
            console.print(
                f"few-shot {held_out} k={k} {m}: macro-F1 {ci['value']:.3f}, "
                f"{held_out} F1 {label_f1[best]:.3f}"
            )
    description_text = next(lab.description for lab in labels() if lab.name == held_out)
    return {
        "held_out": held_out,
        "description": description_text,
        "protocol": (
            f"head trained on train without {held_out}; {held_out} added back from its "
            "description and k examples drawn from its train rows (the median of "
            f"{draws} draws for k > 0); scored on val (all 7 labels)"
        ),
        "quantile": QUANTILE,
        "scale": SCALE,
        "blend": BLEND,
        "rows": rows,
    }


def write(result: dict[str, Any], folder: Path = ARTIFACT_DIR) -> Path:
    """``models/artifacts/fewshot.json`` (read by the method table)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fewshot.json"
    path.write_text(json.dumps(result, indent=2))
    return path
