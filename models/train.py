"""Train the fusion head on cached encoder embeddings with a three-way grouped split.

Protocol (issue 10): the head trains on the "train" groups; every choice (hyper-parameters,
the ``no_incident`` logit offset, the temperature) is made on the "val" groups; the shipped
head is then refitted on train + val with those choices, and the "test" groups, which no
choice has looked at, are scored ONCE on exactly the shipped head, with 95% bootstrap
intervals (``models/fusion_eval.py``).

Multimodal training incidents are built by pairing same-label samples across the three
data sets (they share no real incidents), with modality dropout so that every subset of
modalities is seen. Augmentation (modality and view dropout) is for training only: the
incidents built for validation and test never drop anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from models.fusion import ARTIFACT_DIR, INPUT_MODALITY, INPUTS, META_FILE, FusionHead
from models.splits import three_way
from models.weights import REFIT_SUFFIX
from streams.console import console, progress
from streams.schemas import MODALITIES
from streams.taxonomy import label_names

SPLITS = ("train", "val", "test")


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

    def concat(self, other: Pool) -> Pool:
        """This pool's rows followed by ``other``'s (train + val refit)."""
        tags = None
        if self.tags is not None and other.tags is not None:
            tags = np.concatenate([self.tags, other.tags])
        x = {k: np.concatenate([v, other.x[k]]) for k, v in self.x.items()}
        return Pool(x, np.concatenate([self.y, other.y]), tags)


@dataclass
class TrainConfig:
    """Hyper-parameters (defaults are the shipped choice; the grid in ``GRID`` is tried on val)."""

    steps: int = 1500
    batch: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-2
    hidden: int = 128
    dropout: float = 0.5
    max_events: int = 3
    p_single: float = 0.4
    label_smoothing: float = 0.05
    # Columns of the text vector blanked for a share of training reports (view dropout),
    # so the expert also reads the other view alone; (start, stop) of an English-only view
    # when the text encoder concatenates views, else None (a single multilingual view).
    blank_view: tuple[int, int] | None = None
    view_dropout: float = 0.5
    seed: int = 0
    # Languages of the label descriptions averaged into the zero-shot prompts (label_prompts).
    prompt_langs: str = "en"
    # Call transcripts get an own residual expert and leave the text expert's weights alone
    # (FusionHead._transcript_logits); off: they train the shared text expert.
    transcript_expert: bool = False


# Tried on the validation groups; the best mean of fused and text val macro-F1 is kept.
# Languages of the zero-shot prompts tried: English alone, or averaged with es/it/pt.
PROMPT_LANGS = ("en", "en,es,it,pt")
GRID: list[dict[str, Any]] = [
    {"hidden": h, "dropout": d, "prompt_langs": p}
    for p in PROMPT_LANGS
    for h, d in ((128, 0.5), (256, 0.5), (128, 0.3))
]


def present_labels(pools: dict[str, Pool]) -> np.ndarray:
    """Label indices with at least one sample in some pool (a held-out label has none)."""
    n = len(label_names())
    return np.array([c for c in range(n) if any(len(p.by_label[c]) for p in pools.values())])


def sample_incidents(
    pools: dict[str, Pool],
    n: int,
    rng: np.random.Generator,
    cfg: TrainConfig,
    augment: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """``n`` synthetic incidents: a label, then 1..max_events same-label samples per present modality.

    ``augment`` (training only) blanks a text view and drops call inputs at random; the
    incidents built for validation and test keep every input of the samples they draw.
    """
    available = [m for m in MODALITIES if m in pools]
    y = rng.choice(present_labels(pools), n)
    present = rng.random((n, len(available))) < 0.5
    single = rng.random(n) < cfg.p_single
    only = rng.integers(0, len(available), n)
    present[single] = False
    present[single, only[single]] = True
    for j, m in enumerate(available):  # a modality without this label cannot be present
        has = np.array([len(pools[m].by_label[c]) > 0 for c in y])
        present[:, j] &= has
    for i in np.flatnonzero(~present.any(1)):  # re-seat empty incidents on a modality that has y
        options = [j for j, m in enumerate(available) if len(pools[m].by_label[y[i]])]
        present[i, options[rng.integers(0, len(options))]] = True
    x: dict[str, torch.Tensor] = {}
    mask: dict[str, torch.Tensor] = {}
    k = cfg.max_events
    for j, m in enumerate(available):
        pool = pools[m]
        idx = np.zeros((n, k), dtype=np.int64)
        for c in np.unique(y):
            rows = np.flatnonzero(y == c)
            if len(pool.by_label[c]):
                idx[rows] = pool.by_label[c][rng.integers(0, len(pool.by_label[c]), (len(rows), k))]
        count = rng.integers(1, k + 1, n)
        mk = present[:, j : j + 1] & (np.arange(k)[None, :] < count[:, None])
        for name, arr in pool.x.items():
            x[name] = torch.from_numpy(arr[idx]).float()
            mask[name] = torch.from_numpy(mk.copy())
        if not augment:
            continue
        if m == "text" and cfg.blank_view is not None and cfg.view_dropout > 0:
            lo, hi = cfg.blank_view
            blank = torch.from_numpy(rng.random(n) < cfg.view_dropout)
            x["text"][blank, :, lo:hi] = 0.0
        if m == "audio":
            # Calls with an empty or useless transcript, or with only the transcript.
            drop_t = rng.random(n) < 0.1
            drop_a = (rng.random(n) < 0.1) & ~drop_t
            mask["transcript"][torch.from_numpy(drop_t)] = False
            mask["audio"][torch.from_numpy(drop_a)] = False
    return x, mask, torch.from_numpy(y)


def single_inputs(pool: Pool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Each sample of a pool as its own one-event incident (every input the sample has)."""
    x = {k: torch.from_numpy(v).float().unsqueeze(1) for k, v in pool.x.items()}
    mask = {k: torch.ones(len(pool.y), 1, dtype=torch.bool) for k in pool.x}
    return x, mask


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


def input_dims(pools: dict[str, Pool]) -> dict[str, int]:
    """Expert input widths read from the data (the text width follows the text encoder)."""
    dims: dict[str, int] = {}
    for pool in pools.values():
        for name, arr in pool.x.items():
            dims["text" if name == "transcript" else name] = arr.shape[1]
    return dims


def train_head(
    train: dict[str, Pool], cfg: TrainConfig, prompts: np.ndarray | None = None
) -> FusionHead:
    """Train a fresh head on synthetic incidents drawn from the training pools."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    dims = {"text": 384, "image": 1280, "audio": 384} | input_dims(train)
    if cfg.transcript_expert:
        dims["transcript"] = dims["text"]
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
def val_logits(
    head: FusionHead, pools: dict[str, Pool], cfg: TrainConfig, n_fused: int = 2000
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Un-augmented logits and labels: each modality's samples alone, and fused incidents."""
    out = {}
    for m, pool in pools.items():
        out[m] = (head(*single_inputs(pool)), torch.from_numpy(pool.y))
    x, mask, y = sample_incidents(pools, n_fused, np.random.default_rng(1234), cfg, augment=False)
    out["fused_incidents"] = (head(x, mask), y)
    return out


def evaluate_head(
    head: FusionHead, pools: dict[str, Pool], cfg: TrainConfig, n_fused: int = 2000
) -> tuple[dict[str, object], torch.Tensor, torch.Tensor]:
    """Per-modality and fused metrics (no intervals: for choices); returns all logits too."""
    from models import metrics

    names = label_names()
    report: dict[str, object] = {}
    logits = val_logits(head, pools, cfg, n_fused)
    for k, (lg, y) in logits.items():
        truth = [names[i] for i in y.tolist()]
        pred = [names[i] for i in lg.argmax(-1).tolist()]
        report[k] = {
            "n": len(truth),
            "accuracy": metrics.accuracy(truth, pred),
            "macro_f1": metrics.macro_f1(truth, pred),
            "no_incident_precision": metrics.per_class(truth, pred, ["no_incident"])["no_incident"][
                "precision"
            ],
        }
    return (
        report,
        torch.cat([v[0] for v in logits.values()]),
        torch.cat([v[1] for v in logits.values()]),
    )


# The no_incident precision bar; val must clear it at the 5th percentile of its bootstrap
# (docs/crossfit.md, sixth study): a bar met by a hair on val was missed on unseen events.
NI_PRECISION_BAR = 0.80


def choose_offset(logits: torch.Tensor, y: torch.Tensor) -> float:
    """``no_incident`` logit offset maximising val fused macro-F1 among offsets whose
    ``no_incident`` precision clears the bar with a bootstrap margin (its lower bound,
    :func:`models.metrics.precision_lower_bound`, is >= ``NI_PRECISION_BAR``); when none
    does, the offset with the highest lower bound."""
    from models import metrics

    names = label_names()
    ni = names.index("no_incident")
    truth = y.numpy()
    best: tuple[bool, float, float] = (False, -1.0, 0.0)
    for off in np.round(np.arange(-3.0, 1.01, 0.25), 2):
        shifted = logits.clone()
        shifted[:, ni] += float(off)
        pred = shifted.argmax(-1).numpy()
        low = metrics.precision_lower_bound(truth, pred, ni)
        clears = low >= NI_PRECISION_BAR
        f1 = metrics.macro_f1_array(truth, pred, range(len(names)))
        cand = (clears, f1 if clears else low, float(off))
        if cand[:2] > best[:2]:
            best = cand
    return best[2]


def label_prompts(encoder: Any, langs: str = "en") -> np.ndarray:
    """Text-view vectors of the label descriptions in configs/labels.json (zero-shot prior).

    ``langs`` other than ``en``: each prompt is the normalised mean of the description and its
    translations in those languages, so no language's wording is the prior's only anchor."""
    from streams.taxonomy import labels

    out = []
    for lab in labels():
        texts = [lab.description] + [
            lab.translations[g] for g in langs.split(",") if g != "en" and g in lab.translations
        ]
        v = np.asarray(encoder.encode(texts), dtype=np.float32).mean(0)
        out.append(v / max(float(np.linalg.norm(v)), 1e-12))
    return np.stack(out)


def blank_view_of(encoder: object) -> tuple[int, int] | None:
    """Columns of an English-only view inside a concatenated text vector, if there is one.

    The issue measured that an English view drags Spanish/Italian/Portuguese reports to
    ``no_incident``; when the text vector still holds one, it is blanked in training
    (view dropout) so the multilingual view alone is learnt too.
    """
    views = getattr(encoder, "views", ())
    start = 0
    for name, dim in views:
        if name == "minilm" and len(views) > 1:
            return (start, start + dim)
        start += dim
    return None


def train_only(artifact: str) -> str:
    """The train-only artifact a refit (``<name>-tv.safetensors``) was refitted from: the one
    whose val vectors are unseen, so choices can still be made on val with it."""
    stem, dot, ext = artifact.rpartition(".")
    if not stem.endswith(REFIT_SUFFIX):
        return artifact
    base = stem.removesuffix(REFIT_SUFFIX) + dot + ext
    if not (ARTIFACT_DIR / base).exists():
        raise FileNotFoundError(
            f"{artifact} is a refit but {base} is missing: choose on val with it"
        )
    return base


def load_pools(
    with_audio: bool = True,
    text_cap: int | None = None,
    text_enc: Any = None,
    test_cap: int | None = None,
    vision_enc: Any = None,
    speech_enc: Any = None,
    crossfit: str | None = None,
    crossfit_inputs: tuple[str, ...] = INPUTS,
) -> tuple[dict[str, dict[str, Pool]], dict[str, Any]]:
    """Embed (or load cached embeddings of) the development data; pools per three-way split.

    ``text_cap`` keeps at most that many train/val reports per (event, label), a fixed
    random sample, to bound embedding time on a loaded machine; test keeps every report.
    ``crossfit`` (``"train"`` or ``"train+val"``): the rows of that pool get out-of-fold
    vectors (``models/crossfit.py``) of the head inputs ``crossfit_inputs``, the other rows
    and inputs those of the given encoders.
    """
    from models.datasets import audio_table, image_table, text_table
    from models.embed_cache import audio_embeddings, image_embeddings, text_embeddings
    from models.text import TextEncoder
    from models.vision import VisionEncoder

    names = label_names()

    def labels(df: pl.DataFrame) -> np.ndarray:
        return np.array([names.index(v) for v in df["label"]], dtype=np.int64)

    text_enc = text_enc or TextEncoder()
    tdf, idf = text_table(), image_table()
    tdf = tdf.with_columns(three_way(tdf, "text"))  # on the full table: groups by their size
    if text_cap:
        tdf = cap_rows(tdf, text_cap, test_cap)
    vision_enc = vision_enc or VisionEncoder()
    pools = {
        "text": Pool(
            {"text": text_embeddings(tdf, text_enc)["text"]}, labels(tdf), tdf["lang"].to_numpy()
        ),
        "image": Pool({"image": image_embeddings(idf, vision_enc)["image"]}, labels(idf)),
    }
    split = {"text": tdf["split"].to_numpy(), "image": three_way(idf, "image").to_numpy()}
    info: dict[str, Any] = {
        "text_encoder": getattr(text_enc, "version", type(text_enc).__name__),
        # The fusion service admits only vectors of these encoder versions (its door check).
        "encoders": {
            "text": getattr(text_enc, "version", type(text_enc).__name__),
            "image": vision_enc.version,
        },
        "blank_view": blank_view_of(text_enc),
        "text_groups": {
            s: sorted(tdf.filter(pl.Series(split["text"] == s))["group"].unique()) for s in SPLITS
        },
        "image_groups_n": {
            s: int(idf.filter(pl.Series(split["image"] == s))["group"].n_unique()) for s in SPLITS
        },
    }
    adf: pl.DataFrame | None = None
    if with_audio:
        from models.speech import SpeechEncoder, call_version

        adf = audio_table()
        # Clips whose voice or sentence is held out but not in val/test are never used:
        # transcribing them would cost more than half of the Whisper time for nothing.
        adf = adf.with_columns(three_way(adf, "audio")).filter(pl.col("split") != "unused")
        speech_enc = speech_enc or SpeechEncoder()
        info["encoders"]["audio"] = call_version(
            speech_enc.version, getattr(text_enc, "version", "")
        )
        emb = audio_embeddings(adf, speech_enc, text_enc)
        pools["audio"] = Pool(
            {"audio": emb["audio"], "transcript": emb["transcript_vec"]}, labels(adf)
        )
        split["audio"] = adf["split"].to_numpy()
        info["audio_voices"] = {
            s: sorted(adf.filter(pl.Series(split["audio"] == s))["group"].unique()) for s in SPLITS
        }
    if crossfit is not None:
        info["crossfit"] = _cross_fit(
            pools,
            crossfit,
            text_enc,
            {"text": tdf, "image": idf, "audio": adf},
            crossfit_inputs,
        )
    out = {s: {m: p.subset(split[m] == s) for m, p in pools.items()} for s in SPLITS}
    info["rows"] = {s: {m: len(p.y) for m, p in out[s].items()} for s in SPLITS}
    return out, info


def _cross_fit(
    pools: dict[str, Pool],
    pool: str,
    text_enc: Any,
    tables: dict[str, pl.DataFrame | None],
    inputs: tuple[str, ...],
) -> dict[str, Any]:
    """Put out-of-fold vectors of the head ``inputs`` (``models.fusion.INPUTS``) in the rows
    of ``pool`` (in place); what was used, for the card. A call's two inputs come from one
    fold Whisper: ``audio`` (its embedding) and ``transcript`` (its decoding, embedded)."""
    from models import crossfit
    from models.datasets import audio_table, image_table, text_table

    full = {"text": text_table, "image": image_table, "audio": audio_table}
    rows: dict[str, int] = {}
    encoders: dict[str, list[str]] = {}
    for modality in dict.fromkeys(INPUT_MODALITY[i] for i in inputs):
        df = tables[modality]
        if df is None:
            continue
        mask, feats, paths = crossfit.out_of_fold(modality, df, pool, full[modality](), text_enc)
        encoders[modality] = [p.name for p in paths]
        for name, x in feats.items():
            if name not in inputs:
                continue
            col = pools[modality].x[name].copy()  # never write into a cached array
            col[mask] = x[mask]
            pools[modality].x[name] = col
        rows[modality] = int(mask.sum())
    return {
        "pool": pool,
        "folds": crossfit.FOLDS,
        "inputs": list(inputs),
        "rows": rows,
        "encoders": encoders,
    }


def choose(
    train: dict[str, Pool],
    val: dict[str, Pool],
    base: TrainConfig,
    prompts: dict[str, np.ndarray],
) -> tuple[TrainConfig, FusionHead, list[dict[str, Any]]]:
    """Try ``GRID`` on val; the best mean of fused and text val macro-F1 wins (with its head)."""
    tried: list[dict[str, Any]] = []
    best: tuple[float, TrainConfig, FusionHead] | None = None
    for params in GRID:
        cfg = replace(base, **params)
        head = train_head(train, cfg, prompts[cfg.prompt_langs])
        rep, _, _ = evaluate_head(head, val, cfg)
        fused = rep["fused_incidents"]["macro_f1"]  # type: ignore[index]
        text = rep["text"]["macro_f1"] if "text" in rep else fused  # type: ignore[index]
        objective = (fused + text) / 2
        tried.append({**params, "val_fused_macro_f1": fused, "val_text_macro_f1": text})
        console.print(f"val {params}: fused {fused:.3f}, text {text:.3f}")
        if best is None or objective > best[0]:
            best = (objective, cfg, head)
    assert best is not None
    return best[1], best[2], tried


def cap_rows(df: pl.DataFrame, cap: int, test_cap: int | None = None) -> pl.DataFrame:
    """At most ``cap`` train/val rows per (group, label) (seeded sample); test rows all kept
    unless ``test_cap`` (then at most that many per test (group, label), also seeded).

    ``df`` carries the ``split`` column computed on the full table.
    """

    def sample(part: pl.DataFrame, n: int | None) -> pl.DataFrame:
        if n is None:
            return part
        part = part.sample(fraction=1.0, shuffle=True, seed=0)
        return part.group_by("group", "label", maintain_order=True).head(n).select(df.columns)

    held = sample(df.filter(pl.col("split") == "test"), test_cap)
    rest = sample(df.filter(pl.col("split") != "test"), cap)
    return pl.concat([rest, held]).sort("key")


def run_training(
    out_dir: Path = ARTIFACT_DIR,
    cfg: TrainConfig | None = None,
    search: bool = True,
    refit: bool = True,
    fewshot: bool = True,
    text_cap: int | None = None,
    text_enc: Any = None,
    test_cap: int | None = None,
    choices: dict[str, Any] | None = None,
    choices_only: bool = False,
    crossfit: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Embed, split three ways, choose on val, refit on train+val, score test once, write.

    ``search`` tries the hyper-parameter grid on val (else ``cfg`` as given); ``refit``
    retrains the shipped head on train + val with the val choices (test stays unseen);
    ``fewshot`` measures a held-out label added back from k examples (``models/fewshot.py``).
    ``choices``: an earlier head's metadata whose val choices (config, ``no_incident`` offset,
    temperature) are taken as they are, for encoders refitted on train + val: their val
    vectors are training data, so nothing may be chosen on them again.
    ``choices_only``: stop after the val choices (no refit, no test look) and write them to
    ``out_dir/fusion_choices.json``, for a later ``choices`` run on refitted encoders.
    ``crossfit``: for these head inputs the head trains on out-of-fold vectors
    (``models/crossfit.py``) of the rows it trains on: train + val with ``choices`` (the
    served refits saw them all), else train.
    """
    from models import fusion_eval, model_card

    started = time.perf_counter()
    base = cfg or TrainConfig()
    from models.text import TextEncoder

    vision_enc = speech_enc = None
    if choices_only:  # val must be unseen: the train-only encoders the refits came from
        from models.speech import SpeechEncoder, speech_config
        from models.text import text_selection
        from models.vision import VisionEncoder, selection

        sel = text_selection()
        text_enc = text_enc or TextEncoder(sel["encoder"], train_only(str(sel["artifact"])))
        vision_enc = VisionEncoder(train_only(str(selection().get("artifact", ""))))
        speech = speech_config()
        if speech.artifact:
            speech = replace(speech, artifact=train_only(speech.artifact))
        speech_enc = SpeechEncoder(config=speech)
    text_enc = text_enc or TextEncoder()
    pools, info = load_pools(
        text_cap=text_cap,
        text_enc=text_enc,
        test_cap=test_cap,
        vision_enc=vision_enc,
        speech_enc=speech_enc,
        crossfit=("train+val" if choices is not None else "train") if crossfit else None,
        crossfit_inputs=crossfit,
    )
    info["text_cap"], info["test_cap"] = text_cap, test_cap
    base = replace(base, blank_view=info["blank_view"])
    prompts = {langs: label_prompts(text_enc, langs) for langs in PROMPT_LANGS}
    if choices is not None:
        return _refit_with(choices, pools, info, base, prompts, out_dir, started)
    grid: list[dict[str, Any]] = []
    chosen = base
    if search:
        chosen, head, grid = choose(pools["train"], pools["val"], base, prompts)
    else:
        head = train_head(pools["train"], chosen, prompts[chosen.prompt_langs])
    val_report, _, _ = evaluate_head(head, pools["val"], chosen)
    fused_logits, fused_y = val_logits(head, pools["val"], chosen)["fused_incidents"]
    offset = choose_offset(fused_logits, fused_y)
    ni = label_names().index("no_incident")
    head.bias.data[ni] += offset
    after, logits, y = evaluate_head(head, pools["val"], chosen)
    temperature = fit_temperature(logits, y)
    val_info = {
        "before_offset": val_report,
        "after_offset": after,
        "no_incident_offset": offset,
        "temperature": temperature,
        "grid": grid,
        "text_by_language": fusion_eval.by_language(head, pools["val"]["text"]),
    }
    if fewshot:  # a label held out of training, added back from k examples; scored on val
        from models import fewshot as few

        few.write(few.measure(pools, chosen, prompts[chosen.prompt_langs]), out_dir)
    if choices_only:
        return _write_choices(chosen, val_info, info, out_dir, started)
    if refit:
        # Same choices, twice the crisis events: the val groups are real unseen-event
        # variety the train groups lack (12 events each); test stays untouched.
        train_val = {m: p.concat(pools["val"][m]) for m, p in pools["train"].items()}
        head = train_head(train_val, chosen, prompts[chosen.prompt_langs])
        head.bias.data[ni] += offset
    head.temperature.fill_(temperature)
    test_report = fusion_eval.score_test(head, pools["test"], chosen)
    info["train_seconds"] = round(time.perf_counter() - started, 1)
    info["refit_on_train_val"] = refit
    meta = model_card.write_artifact(head, chosen, val_info, test_report, info, out_dir)
    model_card.print_report(val_info, test_report)
    return meta


CHOICES_FILE = "fusion_choices.json"


def _write_choices(
    chosen: TrainConfig,
    val_info: dict[str, Any],
    info: dict[str, Any],
    out_dir: Path,
    started: float,
) -> dict[str, Any]:
    """The val choices alone (what ``--choices-from`` reads), with the encoders they were
    made on; no head is shipped and test is not looked at."""
    import json
    from dataclasses import asdict
    from datetime import UTC, datetime

    info["train_seconds"] = round(time.perf_counter() - started, 1)
    doc = {
        "version": "choices-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
        "train_config": asdict(chosen),
        "validation": val_info,
        "data": info,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CHOICES_FILE).write_text(json.dumps(doc, indent=1, default=float) + "\n")
    console.print(
        f"val choices {doc['version']}: {chosen}; no_incident offset "
        f"{val_info['no_incident_offset']:+.2f}, temperature {val_info['temperature']:.3f}"
    )
    return doc


def _refit_with(
    choices: dict[str, Any],
    pools: dict[str, dict[str, Pool]],
    info: dict[str, Any],
    base: TrainConfig,
    prompts: dict[str, np.ndarray],
    out_dir: Path,
    started: float,
) -> dict[str, Any]:
    """Train on train + val with an earlier head's val choices; score test once; write."""
    from models import fusion_eval, model_card

    val = choices["validation"]
    known = set(TrainConfig.__dataclass_fields__)
    chosen = replace(
        base,
        **{k: v for k, v in choices["train_config"].items() if k in known and k != "blank_view"},
    )
    train_val = {m: p.concat(pools["val"][m]) for m, p in pools["train"].items()}
    head = train_head(train_val, chosen, prompts[chosen.prompt_langs])
    head.bias.data[label_names().index("no_incident")] += val["no_incident_offset"]
    head.temperature.fill_(val["temperature"])
    test_report = fusion_eval.score_test(head, pools["test"], chosen)
    val_info = {**val, "choices_from": choices["version"]}
    info["train_seconds"] = round(time.perf_counter() - started, 1)
    info["refit_on_train_val"] = True
    info["choices_from"] = choices["version"]
    meta = model_card.write_artifact(head, chosen, val_info, test_report, info, out_dir)
    model_card.print_report(val_info, test_report)
    return meta


def served_recipe(folder: Path = ARTIFACT_DIR) -> tuple[dict[str, Any], tuple[str, ...]] | None:
    """The served head's recipe when it was trained with earlier val choices (on refitted
    encoders): those choices, as a choices file, and the inputs it cross-fitted. None for a
    head that chose on its own val (or none at all): then a run chooses afresh."""
    import json

    path = folder / META_FILE
    if not path.exists():
        return None
    meta = json.loads(path.read_text())
    data, val = meta.get("data", {}), meta.get("validation", {})
    if not data.get("choices_from"):
        return None
    choices = {**meta, "version": val.get("choices_from", data["choices_from"])}
    return choices, tuple((data.get("crossfit") or {}).get("inputs", ()))


def run_all(
    out: Path | None,
    steps: int = 1500,
    tasks: bool = True,
    head: bool = True,
    search: bool = True,
    text_cap: int | None = None,
    test_cap: int | None = None,
    dev_cap: int | None = None,
    adapter_steps: int | None = None,
    choices_from: Path | None = None,
    choices_only: bool = False,
    crossfit: tuple[str, ...] = (),
    transcript_expert: bool = False,
) -> None:
    """``cityfuse train``: the fusion head and/or the CrisisMMD adapter and task heads, then
    the tables. ``adapter_steps`` overrides the adapter's step budget (a quick check);
    ``transcript_expert``: see ``TrainConfig`` (with ``choices_from``, the choices' own);
    ``choices_from`` (a ``fusion_head.json``) reuses its val choices (see :func:`run_training`)."""
    import json

    from models import crisismmd
    from models.text import FINETUNED_E5, TextEncoder

    out_dir = out or ARTIFACT_DIR
    if head:
        cfg = TrainConfig(steps=steps, transcript_expert=transcript_expert)
        choices = json.loads(choices_from.read_text()) if choices_from else None
        recipe = served_recipe() if choices is None and not choices_only else None
        if recipe is not None:
            # The served encoders are refits whose val vectors are seen: nothing may be chosen
            # on val again, so a plain run rebuilds the served head from its recorded recipe.
            choices, crossfit = recipe[0], crossfit or recipe[1]
            console.print(
                f"the served head's recipe: choices {choices['version']}, "
                f"cross-fitted inputs {list(crossfit) or 'none'}"
            )
        meta = run_training(
            out_dir,
            cfg,
            search=search,
            text_cap=text_cap,
            test_cap=test_cap,
            choices=choices,
            choices_only=choices_only,
            crossfit=crossfit,
        )
        console.print(f"wrote {out_dir} ({meta['version']})")
    if tasks:
        from models.crisismmd_adapter import ADAPTER, AdapterConfig, train_adapter

        cfg_a = AdapterConfig(steps=adapter_steps) if adapter_steps else AdapterConfig()
        adapter = train_adapter(cfg_a, out_dir=out_dir, cap=text_cap)
        task_encoder = TextEncoder(FINETUNED_E5, artifact=str((out_dir / ADAPTER).resolve()))
        for task in crisismmd.TASKS:
            meta = crisismmd.train_task(task, task_encoder, out_dir, text_cap, dev_cap, adapter)
            dev = meta["dev"]
            console.print(
                f"{meta['task']}: dev accuracy {dev['accuracy']['value']:.3f}, "
                f"macro-F1 {dev['macro_f1']['value']:.3f} ({meta['kind']}, {meta['config']})"
            )
    if out is None and not choices_only:  # the shipped artifacts changed: regenerate tables
        from models.method_table import update_docs

        update_docs()
