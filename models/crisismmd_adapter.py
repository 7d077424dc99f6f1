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

import torch

from models.crisismmd import TASKS, capped, load_split
from models.finetune_text import (
    AuxTasks,
    FTConfig,
    _metadata,
    build,
    save_artifact,
    trainable_state,
    warmup_then_decay,
)
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


def train_adapter(
    cfg: AdapterConfig | None = None, out_dir: Path = ARTIFACT_DIR, cap: int | None = None
) -> dict[str, Any]:
    """Train the adapter on both tasks, save ``out_dir/crisismmd_encoder.safetensors``.

    ``cap`` keeps at most that many train tweets per (event, label). Returns the run's
    metadata (config, trainable parameters, seconds, bytes, final loss); the task heads
    record it beside their dev scores.
    """
    cfg = cfg or AdapterConfig()
    torch.manual_seed(cfg.seed)
    text_cfg = cfg.text_config()
    model, tokenizer = build("lora", text_cfg)
    train = {t: load_split(t, "train") for t in TASKS}
    if cap:
        train = {t: capped(df, cap) for t, df in train.items()}
    tasks = AuxTasks.from_frames(train, rng_seed=cfg.seed, class_power=cfg.class_power)
    enc_params = [p for n, p in model.named_parameters() if p.requires_grad and "head" not in n]
    opt = torch.optim.AdamW(
        [
            {"params": enc_params, "lr": cfg.lr},
            {"params": tasks.heads.parameters(), "lr": cfg.head_lr},
        ],
        weight_decay=0.01,
    )
    sched = warmup_then_decay(opt, cfg.warmup, cfg.steps)
    t0 = time.perf_counter()
    loss = torch.zeros(())
    model.train()
    with progress() as bar:
        job = bar.add_task("CrisisMMD adapter: train", total=cfg.steps)
        for _ in range(cfg.steps):
            loss = tasks.loss(model, tokenizer, cfg.max_length, per_task=cfg.batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(job, advance=1, description=f"CrisisMMD adapter: loss {loss.item():.3f}")
    model.eval()
    # The 7-label city head in the file is the untrained one ``build`` made; only the
    # encoder's vectors are used (the task heads are fitted on them afterwards).
    path = out_dir / ADAPTER
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = _metadata(text_cfg) | {"purpose": "CrisisMMD text benchmark (evaluate --task)"}
    save_artifact(trainable_state(model), path, meta)
    return {
        "artifact": ADAPTER,
        "config": asdict(cfg),
        "train_rows": {t: len(texts) for t, (texts, _) in tasks.rows.items()},
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
