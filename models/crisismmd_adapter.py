"""A CrisisMMD text adapter: LoRA on multilingual-e5-small, trained on the benchmark's train split.

The served text vector is tuned for the city's 7 incident labels. The CrisisMMD tasks ask
something else (is a tweet informative; which humanitarian category), and task heads on that
shared vector stop at about 0.84 informative accuracy on dev, whatever the head. So the
benchmark gets its own encoder: one LoRA adapter trained on both tasks at once (a linear head
per task, class-weighted cross-entropy), saved in the text-artifact format of
:mod:`models.finetune_text` so :class:`models.text.TextEncoder` loads it like any text artifact.
The task heads of :mod:`models.crisismmd` are then fitted and chosen on its vectors, and
``evaluate --task`` embeds the recording's tweets with it. The served pipeline is unchanged.

Trained on the CrisisMMD train split only (every event: the adapter never serves city reports,
so the city validation and test groups do not constrain it); dev chooses the task heads; the
official test split is kept by the project.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from safetensors.torch import save_file
from torch import nn

from models.crisismmd import CLASSES, TASKS, capped, load_split
from models.finetune_text import FTConfig, _metadata, build, tokenize, trainable_state
from models.fusion import ARTIFACT_DIR
from streams.console import progress

ADAPTER = "crisismmd_encoder.safetensors"


@dataclass
class AdapterConfig:
    """Hyper-parameters of the adapter (chosen on CrisisMMD dev)."""

    steps: int = 900  # about 3.5 passes over informative train, 5.5 over humanitarian
    batch: int = 32  # tweets per task per step
    lr: float = 5e-4
    head_lr: float = 2e-3
    lora_r: int = 16
    lora_targets: str = "query,key,value,dense"  # attention and feed-forward layers
    # Class weights (total / count) ** power: 0.5 lifts the rare humanitarian classes
    # (70 `affected_individuals` tweets) without drowning the frequent ones.
    class_power: float = 0.5
    max_length: int = 64
    warmup: int = 30
    seed: int = 0

    def text_config(self) -> FTConfig:
        """The :class:`FTConfig` stored in the artifact (what ``load_classifier`` rebuilds)."""
        return FTConfig(
            method="lora",
            steps=self.steps,
            batch=self.batch,
            max_length=self.max_length,
            lr=self.lr,
            lora_r=self.lora_r,
            lora_targets=self.lora_targets,
            seed=self.seed,
            tag="crisismmd",
        )


def train_rows(task: str, cap: int | None = None) -> tuple[list[str], np.ndarray]:
    """Cleaned train tweets of ``task`` and their class ids (``cap`` per event and label)."""
    from models.text import clean_text

    df: pl.DataFrame = load_split(task, "train")
    if cap:
        df = capped(df, cap)
    y = np.array([CLASSES[task].index(v) for v in df["label"]])
    return [clean_text(t) for t in df["text"]], y


def class_weights(y: np.ndarray, n_classes: int, power: float) -> torch.Tensor:
    """``(total / count) ** power``, scaled to mean 1."""
    counts = np.maximum(np.bincount(y, minlength=n_classes), 1).astype(np.float64)
    w = (counts.sum() / counts) ** power
    return torch.tensor(w / w.mean(), dtype=torch.float32)


def train_adapter(
    cfg: AdapterConfig | None = None, out_dir: Path = ARTIFACT_DIR, cap: int | None = None
) -> dict[str, Any]:
    """Train the adapter on both tasks, save ``out_dir/crisismmd_encoder.safetensors``.

    Returns the run's metadata (config, trainable parameters, seconds, bytes, final loss);
    the task heads record it beside their dev scores.
    """
    cfg = cfg or AdapterConfig()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    text_cfg = cfg.text_config()
    model, tokenizer = build("lora", text_cfg)
    data = {t: train_rows(t, cap) for t in TASKS}
    heads = nn.ModuleDict({t: nn.Linear(model.head.in_features, len(CLASSES[t])) for t in TASKS})
    weights = {t: class_weights(data[t][1], len(CLASSES[t]), cfg.class_power) for t in TASKS}
    enc_params = [p for n, p in model.named_parameters() if p.requires_grad and "head" not in n]
    opt = torch.optim.AdamW(
        [{"params": enc_params, "lr": cfg.lr}, {"params": heads.parameters(), "lr": cfg.head_lr}],
        weight_decay=0.01,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * max(0.0, 1 - s / cfg.steps)
    )
    t0 = time.perf_counter()
    loss = torch.zeros(())
    model.train()
    with progress() as bar:
        job = bar.add_task("CrisisMMD adapter: train", total=cfg.steps)
        for _ in range(cfg.steps):
            loss = torch.zeros(())
            for t in TASKS:
                texts, y = data[t]
                j = rng.integers(0, len(texts), cfg.batch)
                emb = model.embed(**tokenize(tokenizer, [texts[i] for i in j], cfg.max_length))
                logits = heads[t](emb)
                loss = loss + nn.functional.cross_entropy(
                    logits, torch.from_numpy(y[j]), weight=weights[t]
                )
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(job, advance=1, description=f"CrisisMMD adapter: loss {loss.item():.3f}")
    model.eval()
    # The 7-label city head in the file is the untrained one ``build`` made; only the
    # encoder's vectors are used (the task heads are fitted on them afterwards).
    # fp16 halves the file (5.3 MB -> 2.7 MB); loading casts back to the fp32 parameters.
    state = {k: v.half() for k, v in trainable_state(model).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ADAPTER
    meta = _metadata(text_cfg) | {"purpose": "CrisisMMD text benchmark (evaluate --task)"}
    save_file(state, str(path), metadata=meta)
    return {
        "artifact": ADAPTER,
        "config": asdict(cfg),
        "train_rows": {t: len(data[t][0]) for t in TASKS},
        "train_cap_per_event_label": cap,
        "trainable_params": int(sum(p.numel() for p in enc_params)),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "artifact_bytes": path.stat().st_size,
        "final_loss": round(float(loss.detach()), 4),
    }


def card_lines(folder: Path = ARTIFACT_DIR) -> list[str]:
    """The text model card's CrisisMMD section, from the task heads' metadata."""
    import json

    metas = [
        json.loads(p.read_text(encoding="utf-8"))
        for t in TASKS
        if (p := folder / f"crisismmd_{t}.json").exists()
    ]
    adapter = next((m["encoder"] for m in metas if m.get("encoder")), None)
    if adapter is None:
        return []
    cfg = adapter["config"]
    lines = [
        "",
        "## CrisisMMD adapter (`evaluate --task` only)",
        "",
        f"`{adapter['artifact']}`: LoRA r={cfg['lora_r']} on `{cfg['lora_targets']}` of the same "
        f"base (sha256 above), {adapter['trainable_params']:,} parameters stored fp16 "
        f"({adapter['artifact_bytes'] / 1e6:.2f} MB), trained {cfg['steps']} steps "
        f"({adapter['train_seconds']:.0f} s on 2 cores) on both CrisisMMD train tasks at once "
        f"({adapter['train_rows']['informative']:,} informative and "
        f"{adapter['train_rows']['humanitarian']:,} humanitarian tweets, class weights "
        f"(total/count)^{cfg['class_power']}). The task heads are fitted on its vectors and "
        "chosen on dev; the official test split is kept by the project.",
        "",
        "| task | head | dev accuracy [95% CI] | dev macro-F1 [95% CI] |",
        "|---|---|---|---|",
    ]
    for m in metas:
        acc, f1 = m["dev"]["accuracy"], m["dev"]["macro_f1"]
        lines.append(
            f"| {m['task']} | {m['kind']} | {acc['value']:.3f} [{acc['lo']:.3f}, {acc['hi']:.3f}]"
            f" | {f1['value']:.3f} [{f1['lo']:.3f}, {f1['hi']:.3f}] |"
        )
    return lines
