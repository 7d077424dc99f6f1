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

``--loeo`` is the leave-events-out reading of the same grid (docs/crossfit.md, seventh
study): val holds a handful of events, while a city's reports come from events no training
run saw. Each of the two train + val text fold encoders (``recipe_folds``: the recipe of
``STUDY_BASE``, served while these studies ran, fitted on half of the events) embeds every train + val report at each ``wise``; a
linear head fitted on the encoder's own half predicts the other half, so every report is
read once by a model that never saw its event. ``wise = 0`` is frozen e5.

``--language-study`` reads the same rows with language directions taken out of the vectors
(``models.language_basis``; docs/crossfit.md, ninth study). ``--codeswitch-study`` reads
them with fold encoders trained on code-switched reports (``models.codeswitch``; eleventh
study).
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
    incidents_as_none,
    load_classifier,
    load_splits,
    most_even,
    run,
    save_artifact,
    scale_lora,
    score,
    trainable_state,
)
from models.splits import fit_suffix
from streams.console import console
from streams.taxonomy import label_names

GRID = (0.25, 0.5, 0.75, 1.0)
STUDY_FILE = "text_wise.json"
LOEO_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
LOEO_FILE = "text_wise_loeo.json"
LOEO_POOL = "train+val"
LANGUAGE_GRID = (2, 3, 4, 5, 8)
LANGUAGE_FILE = "text_language_loeo.json"
# The recipe every leave-events-out study here reads (served until the fourteenth study): the
# studies' commands rebuild their files whatever configs/models.json serves now.
STUDY_BASE = "text_lora-all16-s300-tv.safetensors"
CODESWITCH_P = 0.5  # the eleventh study's share (its rule fixed it); --codeswitch-p for others
CITY_LANGS = ("es", "it", "pt")


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


def _fold_vectors(path: Path, wise: float, keys: list[str], texts: list[str]) -> np.ndarray:
    """Vectors of ``texts`` from the fold encoder at ``path`` scaled to ``wise``, cached by the
    encoder's exact weights and the rows (``models.embed_cache``)."""
    from models.embed_cache import cached
    from models.text_e5ft import artifact_version

    def embed() -> dict[str, np.ndarray]:
        model, tokenizer, cfg = load_classifier(path)
        scale_lora(model, wise)
        return {"text": _vectors(model, tokenizer, texts, cfg, f"{path.stem} wise {wise:g}")}

    return cached("text", f"{artifact_version(path)}-w{wise:g}", keys, embed)["text"]


def _loeo_predictions(
    paths: list[Path], rows_df: Any, fold: np.ndarray, wise: float, basis_k: int = 0
) -> np.ndarray:
    """Leave-events-out label ids of every train + val report: the fold encoder fitted on
    one half embeds all reports at ``wise``; a linear head fitted on that half reads the
    other. ``basis_k``: language directions removed first, the basis estimated on the
    encoder's own half (``models.language_basis``)."""
    from models.language_basis import language_basis, remove

    keys, texts = rows_df["key"].to_list(), rows_df["text"].to_list()
    y, langs = rows_df["y"].to_numpy(), rows_df["lang"].to_numpy()
    pred = np.full(len(y), -1)
    for held, path in enumerate(paths):  # path: fitted on the rows outside fold `held`
        x = _fold_vectors(path, wise, keys, texts)
        own = fold != held
        x = remove(x, language_basis(x[own], langs[own], basis_k))
        head = fit_head(x[own], y[own], len(label_names()))
        with torch.no_grad():
            pred[~own] = head(torch.from_numpy(x[~own])).argmax(1).numpy()
    return pred


def _loeo_rows(threads: int = 2) -> tuple[list[Path], Any, np.ndarray]:
    """The two train + val fold encoders of ``STUDY_BASE``, the train + val reports and their
    folds (dealt as ``models.crossfit`` deals them)."""
    from models.crossfit import fold_ids
    from models.datasets import text_table

    paths = recipe_folds(threads=threads)
    rows_df = load_splits(fit_on=LOEO_POOL).train
    return paths, rows_df, fold_ids(rows_df, text_table(), "text", LOEO_POOL)


def loeo_study(grid: tuple[float, ...] = LOEO_GRID, threads: int = 2) -> dict[str, Any]:
    """Leave-events-out macro-F1 of each ``wise`` (module docstring); the choice keeps the
    served ``wise = 1`` unless another beats it with a grouped interval above 0."""
    from models.metrics import grouped_difference

    torch.set_num_threads(threads)
    paths, rows_df, fold = _loeo_rows(threads)
    y, langs = rows_df["y"].to_numpy(), rows_df["lang"].to_numpy()
    groups = rows_df["group"].to_numpy()
    preds: dict[float, np.ndarray] = {}
    rows: list[dict[str, Any]] = []
    for wise in grid:
        preds[wise] = _loeo_predictions(paths, rows_df, fold, wise)
        s = score(y, preds[wise], langs)
        rows.append({"wise": wise, "loeo": s})
        console.print(
            f"wise {wise:g}: leave-events-out macro-F1 {s['macro_f1']['value']:.3f} "
            + " ".join(f"{k} {v['value']:.3f}" for k, v in s["per_language"].items())
            + f"; incidents->none {s['incidents_as_no_incident']:.1%}"
        )
    served = 1.0
    for r in rows:
        r["minus_served"] = grouped_difference(
            y, preds[r["wise"]], preds[served], groups, range(len(label_names()))
        )
    better = [r for r in rows if r["minus_served"]["lo"] > 0]
    chosen = (
        float(max(better, key=lambda r: r["loeo"]["macro_f1"]["value"])["wise"])
        if better
        else served
    )
    doc = {
        "_doc": (
            "Leave-events-out WiSE-FT study (models/text_wise.py --loeo; docs/crossfit.md, "
            "seventh study): every train + val report read by a fold encoder and linear head "
            "that never saw its event. Rule: the served wise 1 stays unless another wise's "
            "macro-F1 minus the served one has a 95% event-bootstrap interval above 0; then "
            "the best such wise."
        ),
        "folds": [p.name for p in paths],
        "rows": rows,
        "chosen": chosen,
    }
    (ARTIFACTS / LOEO_FILE).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return doc


def subset_scores(
    y: np.ndarray, pred: np.ndarray, groups: np.ndarray, mask: np.ndarray
) -> dict[str, Any]:
    """Macro-F1, accuracy, size, events and real incidents read as none of the rows in ``mask``
    (the language studies' per-subset figures)."""
    from models.metrics import macro_f1_array

    labels = list(range(len(label_names())))
    return {
        "macro_f1": macro_f1_array(y[mask], pred[mask], labels),
        "accuracy": float(np.mean(pred[mask] == y[mask])),
        "n": int(mask.sum()),
        "events": len(set(groups[mask])),
        "incidents_as_no_incident": incidents_as_none(y[mask], pred[mask]),
    }


def language_study(
    grid: tuple[int, ...] = LANGUAGE_GRID, chosen_k: int = 3, threads: int = 2
) -> dict[str, Any]:
    """The ninth study (docs/crossfit.md): leave-events-out reads of the served ``wise = 1``
    vectors with ``k`` language directions removed. ``chosen_k`` (picked on the grid's
    non-English macro-F1) ships only if its non-English gain has an event-bootstrap interval
    above 0 and its change over all reports a lower bound >= -0.02."""
    from models.metrics import grouped_difference

    torch.set_num_threads(threads)
    paths, rows_df, fold = _loeo_rows(threads)
    y, langs = rows_df["y"].to_numpy(), rows_df["lang"].to_numpy()
    groups = rows_df["group"].to_numpy()
    labels = list(range(len(label_names())))
    other = langs != "en"
    preds = {k: _loeo_predictions(paths, rows_df, fold, 1.0, k) for k in sorted({0, *grid})}
    rows = []
    for k, pred in preds.items():
        s = score(y, pred, langs)
        s["non_english"] = subset_scores(y, pred, groups, other)
        rows.append({"k": k, "loeo": s})
        console.print(
            f"k {k}: all {s['macro_f1']['value']:.3f}, non-English "
            f"{s['non_english']['macro_f1']:.3f} (accuracy {s['non_english']['accuracy']:.3f}, "
            f"incidents->none {s['non_english']['incidents_as_no_incident']:.1%})"
        )
    gain_other = grouped_difference(
        y[other], preds[chosen_k][other], preds[0][other], groups[other], labels
    )
    change_all = grouped_difference(y, preds[chosen_k], preds[0], groups, labels)
    ships = gain_other["lo"] > 0 and change_all["lo"] >= -0.02
    doc = {
        "_doc": (
            "Language directions removed from the served text vectors, read leave-events-out "
            "(models/text_wise.py --language-study; docs/crossfit.md, ninth study)."
        ),
        "folds": [p.name for p in paths],
        "rows": rows,
        "chosen_k": chosen_k,
        "non_english_gain": gain_other,
        "all_change": change_all,
        "ships": ships,
    }
    (ARTIFACTS / LANGUAGE_FILE).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    console.print(
        f"k {chosen_k} - k 0: non-English {gain_other['value']:+.3f} "
        f"[{gain_other['lo']:+.3f}, {gain_other['hi']:+.3f}], all {change_all['value']:+.3f} "
        f"[{change_all['lo']:+.3f}, {change_all['hi']:+.3f}] -> "
        + ("ships" if ships else "does not ship")
    )
    return doc


def recipe_folds(codeswitch: float = 0.0, threads: int = 2, pair: float = 0.0) -> list[Path]:
    """The two train + val text fold encoders of the studies' base recipe (``STUDY_BASE``) with
    ``codeswitch`` (and ``codeswitch_pair``) set, fitted once into the cross-fit cache; the
    plain recipe's are the names ``models.crossfit`` gave them while it was served."""
    from models.crossfit import FOLDS, fold_dir
    from models.reproduce import recipe, text_variant
    from models.splits import crossfit_fit_on

    method, config = recipe(ARTIFACTS / STUDY_BASE)
    suffix = (f"-cs{round(codeswitch * 100)}" if codeswitch else "") + (
        f"-csp{round(pair * 100)}" if pair else ""
    )
    steps, tag, settings = text_variant(config, suffix)
    settings |= {"codeswitch": codeswitch, "threads": threads}
    if pair:
        settings["codeswitch_pair"] = pair
    paths = []
    for held in range(FOLDS):
        fit_on = crossfit_fit_on(LOEO_POOL, held, FOLDS)
        path = fold_dir() / f"text_{method}-{tag}{fit_suffix(fit_on)}.safetensors"
        if not path.exists():
            run(method, steps=steps, tag=tag, out_dir=fold_dir(), **settings, fit_on=fit_on)
        paths.append(path)
    return paths


def codeswitch_file(p: float, pair: float = 0.0) -> str:
    """Where the study of code-switch share ``p`` (or consistency weight ``pair``) writes."""
    return f"text_codeswitch{f'pair{round(pair * 100)}' if pair else round(p * 100)}_loeo.json"


def codeswitch_study(
    p: float = CODESWITCH_P, threads: int = 2, pair: float = 0.0
) -> dict[str, Any]:
    """The eleventh, twelfth and fourteenth studies (docs/crossfit.md): leave-events-out reads
    of fold encoders trained with ``p`` of the English rows code-switched (or, with ``pair``,
    every English row kept and its switched copy pulled to it with that weight) against the
    base recipe's (``STUDY_BASE``). Ships only if the es/it/pt macro-F1 gain is above 0 at the point and the
    change over all reports has a 95% event-bootstrap lower bound >= -0.02."""
    from models.metrics import grouped_difference

    torch.set_num_threads(threads)
    settings: list[dict[str, float]] = [{"codeswitch": 0.0}]
    settings.append({"codeswitch": 0.0, "pair": pair} if pair else {"codeswitch": p})
    names = ["0.0", f"pair{pair:g}" if pair else str(p)]
    base_folds, rows_df, fold = _loeo_rows(threads)
    folds = [base_folds, recipe_folds(settings[1]["codeswitch"], threads, pair)]
    y, langs = rows_df["y"].to_numpy(), rows_df["lang"].to_numpy()
    groups = rows_df["group"].to_numpy()
    labels = list(range(len(label_names())))
    city, other = np.isin(langs, CITY_LANGS), langs != "en"
    preds = [_loeo_predictions(paths, rows_df, fold, 1.0) for paths in folds]

    rows = []
    for setting, name, pred in zip(settings, names, preds, strict=True):
        s = score(y, pred, langs)
        s["city_languages"] = subset_scores(y, pred, groups, city)
        s["non_english"] = subset_scores(y, pred, groups, other)
        s["per_event_city"] = {
            str(g): float(np.mean(pred[city & (groups == g)] == y[city & (groups == g)]))
            for g in sorted(set(groups[city]))
        }
        rows.append({**setting, "loeo": s})
        console.print(
            f"codeswitch {name}: all {s['macro_f1']['value']:.3f}, es/it/pt "
            f"{s['city_languages']['macro_f1']:.3f} (accuracy "
            f"{s['city_languages']['accuracy']:.3f}, incidents->none "
            f"{s['city_languages']['incidents_as_no_incident']:.1%}), non-English "
            f"{s['non_english']['macro_f1']:.3f}"
        )
    gain_city = grouped_difference(y[city], preds[1][city], preds[0][city], groups[city], labels)
    change_all = grouped_difference(y, preds[1], preds[0], groups, labels)
    ships = gain_city["value"] > 0 and change_all["lo"] >= -0.02
    doc = {
        "_doc": (
            "Code-switched training reports against the served text recipe, read "
            "leave-events-out (models/text_wise.py --codeswitch-study; docs/crossfit.md, "
            "eleventh study)."
        ),
        "folds": {n: [x.name for x in paths] for n, paths in zip(names, folds, strict=True)},
        "rows": rows,
        "city_languages_gain": gain_city,
        "all_change": change_all,
        "ships": ships,
    }
    (ARTIFACTS / codeswitch_file(p, pair)).write_text(
        json.dumps(doc, indent=1) + "\n", encoding="utf-8"
    )
    console.print(
        f"codeswitch {names[1]} - served: es/it/pt {gain_city['value']:+.3f} "
        f"[{gain_city['lo']:+.3f}, {gain_city['hi']:+.3f}], all {change_all['value']:+.3f} "
        f"[{change_all['lo']:+.3f}, {change_all['hi']:+.3f}] -> "
        + ("ships" if ships else "does not ship")
    )
    return doc


def choose(rows: list[dict[str, Any]]) -> float:
    """The text rule (:func:`models.finetune_text.most_even`) over ``wise`` rows."""
    pick = most_even(
        rows,
        lambda r: r["val"]["macro_f1"]["value"],
        lambda r: [v["value"] for v in r["val"]["per_language"].values()],
    )
    return float(pick["wise"])


def wise_tag(cfg: FTConfig, wise: float) -> str:
    """The tag of ``cfg``'s artifact at ``wise``. The fit's suffix stays last, so
    ``models.train.train_only`` still pairs a refit with its train-only twin."""
    suffix = fit_suffix(cfg.fit_on)
    return f"{cfg.tag.removesuffix(suffix)}-w{wise:g}".lstrip("-") + suffix


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
    model, _, _ = load_classifier(ARTIFACTS / artifact)  # the file keeps the trained adapter
    model.head.load_state_dict(head.state_dict())
    new = replace(cfg, wise=wise, tag=wise_tag(cfg, wise))
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
    ap.add_argument("--loeo", action="store_true", help="the leave-events-out study")
    ap.add_argument(
        "--language-study", action="store_true", help="language directions out (ninth study)"
    )
    ap.add_argument(
        "--codeswitch-study", action="store_true", help="code-switched training (eleventh study)"
    )
    ap.add_argument(
        "--codeswitch-p", type=float, default=CODESWITCH_P, help="its share of English rows"
    )
    ap.add_argument(
        "--codeswitch-pair", type=float, default=0.0, help="or: copies with this consistency"
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.codeswitch_study:
        codeswitch_study(args.codeswitch_p, threads=args.threads, pair=args.codeswitch_pair)
    elif args.language_study:
        language_study(threads=args.threads)
    elif args.loeo:
        console.print(f"chosen wise = {loeo_study(threads=args.threads)['chosen']:g}")
    elif args.study:
        doc = study(args.study, threads=args.threads)
        console.print(f"chosen wise = {doc['chosen']}")
    elif args.apply and args.wise is not None:
        apply(args.apply, args.wise, threads=args.threads)
    else:
        ap.error("give --study ARTIFACT, or --apply ARTIFACT --wise W")


if __name__ == "__main__":
    main()
