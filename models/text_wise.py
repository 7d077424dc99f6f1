"""Weight-space ensembling of the fine-tuned text encoder with its base (WiSE-FT).

Fine-tuning e5 on mostly English city reports moves it away from the multilingual alignment
that carries a model to Spanish, Italian and Portuguese. WiSE-FT (Wortsman et al., CVPR 2022)
keeps a share of the base: the served weights are ``base + wise * delta``. For a LoRA artifact
the delta is ``B @ A``, so scaling every LoRA ``B`` by ``wise`` before the merge is exact.

The linear head a method trained fits the ``wise = 1`` vectors only, so each ``wise`` gets its
own head: the same class-balanced softmax regression (:func:`models.finetune_text.fit_head`)
on the training rows' vectors at that ``wise``.

``python -m models.text_wise --study text_lora-all16-s300.safetensors`` scores a grid of
``wise`` on validation (a train-only artifact: its val rows are unseen) and writes
``models/artifacts/text_wise.json``; ``--apply ARTIFACT --wise W`` writes
``text_<method>-w<W>.safetensors`` (same adapter, ``wise`` in its recipe, the refitted head).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.finetune_text import (
    ARTIFACTS,
    CHOICE_MARGIN,
    E5Classifier,
    FTConfig,
    _metadata,
    embed_texts,
    fit_head,
    load_classifier,
    load_splits,
    most_even,
    save_artifact,
    scale_lora,
    score,
    trainable_state,
)
from streams.console import console

GRID = (0.25, 0.5, 0.75, 1.0)
STUDY_FILE = "text_wise.json"


def _vectors(
    model: E5Classifier, tokenizer: Any, texts: list[str], cfg: FTConfig, what: str
) -> np.ndarray:
    return embed_texts(model, tokenizer, texts, cfg.max_length, what)[0]


def study(artifact: str, grid: tuple[float, ...] = GRID, threads: int = 2) -> dict[str, Any]:
    """Val macro-F1 (per language, incidents read as none) of each ``wise`` in ``grid``."""
    torch.set_num_threads(threads)
    path = ARTIFACTS / artifact
    _, _, cfg = load_classifier(path)
    if cfg.method != "lora" or cfg.fit_on != "train":
        raise ValueError(f"{artifact}: the study needs a LoRA artifact trained on train only")
    splits = load_splits(fit_on="train")
    ytr, yval = splits.train["y"].to_numpy(), splits.val["y"].to_numpy()
    rows = []
    for wise in grid:
        model, tokenizer, _ = load_classifier(path)
        scale_lora(model, wise)
        xtr = _vectors(model, tokenizer, splits.train["text"].to_list(), cfg, f"wise {wise}: train")
        xva = _vectors(model, tokenizer, splits.val["text"].to_list(), cfg, f"wise {wise}: val")
        head = fit_head(xtr, ytr, len(splits.labels))
        with torch.no_grad():
            pred = head(torch.from_numpy(xva)).argmax(1).numpy()
        s = score(yval, pred, splits.val["lang"].to_numpy())
        rows.append({"wise": wise, "val": s})
        console.print(
            f"wise {wise}: val macro-F1 {s['macro_f1']['value']:.3f} "
            + " ".join(f"{k} {v['value']:.3f}" for k, v in s["per_language"].items())
            + f"; incidents->none {s['incidents_as_no_incident']:.1%}"
        )
    chosen = choose(rows)
    doc = {
        "_doc": (
            "WiSE-FT study (models/text_wise.py): the LoRA delta of a train-only artifact "
            "scaled by `wise`, a linear head refitted on the train rows per `wise`, scored on "
            "val (every non-English val row + 1000 English). Chosen by the text rule: best val "
            f"macro-F1; within {CHOICE_MARGIN}, the best weakest language."
        ),
        "artifact": artifact,
        "rows": rows,
        "chosen": chosen,
    }
    (ARTIFACTS / STUDY_FILE).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return doc


def choose(rows: list[dict[str, Any]]) -> float:
    """The text rule (:func:`models.finetune_text.most_even`) over ``wise`` rows."""
    pick = most_even(
        rows,
        lambda r: r["val"]["macro_f1"]["value"],
        lambda r: [v["value"] for v in r["val"]["per_language"].values()],
    )
    return float(pick["wise"])


def apply(artifact: str, wise: float, out_dir: Path = ARTIFACTS, threads: int = 2) -> Path:
    """``text_<name>-w<wise>.safetensors``: the adapter with ``wise`` in its recipe and a head
    refitted on the vectors of the rows it was trained on (its ``fit_on``)."""
    torch.set_num_threads(threads)
    model, tokenizer, cfg = load_classifier(ARTIFACTS / artifact)
    if cfg.method != "lora":
        raise ValueError(f"{artifact}: WiSE applies to LoRA artifacts")
    scale_lora(model, wise)
    splits = load_splits(fit_on=cfg.fit_on)
    x = _vectors(model, tokenizer, splits.train["text"].to_list(), cfg, f"wise {wise}: head")
    head = fit_head(x, splits.train["y"].to_numpy(), len(splits.labels))
    model.head.load_state_dict(head.state_dict())
    scale_lora(model, 1 / wise)  # the file keeps the trained adapter; loading scales it
    new = replace(cfg, wise=wise, tag=f"{cfg.tag}-w{wise:g}".lstrip("-"))
    path = out_dir / f"text_{new.name}.safetensors"
    save_artifact(trainable_state(model), path, _metadata(new))
    console.print(f"wrote {path.name} (wise {asdict(new)['wise']})")
    return path


def main() -> None:
    """CLI: ``--study ARTIFACT`` or ``--apply ARTIFACT --wise W``."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--study", default=None, help="a train-only LoRA artifact to study on val")
    ap.add_argument("--apply", default=None, help="an artifact to write with --wise")
    ap.add_argument("--wise", type=float, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.study:
        doc = study(args.study, threads=args.threads)
        console.print(f"chosen wise = {doc['chosen']}")
    elif args.apply and args.wise:
        apply(args.apply, args.wise, threads=args.threads)
    else:
        ap.error("give --study ARTIFACT, or --apply ARTIFACT --wise W")


if __name__ == "__main__":
    main()
