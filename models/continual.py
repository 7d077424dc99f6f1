"""Continual learning of the fusion head from operator feedback, without forgetting.

An update starts from the head in service and fine-tunes a copy on:
- the incidents operators gave a verdict on (their label is the target),
- rehearsal: synthetic incidents drawn from the training pools (models/train.py),
- distillation: on the same rehearsal incidents, the new head's softened output is pulled
  towards the previous head's (Learning without Forgetting), so what the head knew
  elsewhere is kept while it learns the new event.
Each update is a NEW versioned artifact in a model folder; a pointer file (``CURRENT``)
names the one in service, and :class:`HeadWatcher` lets the fusion service switch to it
without a restart.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import save_file

from models.fusion import ARTIFACT_DIR, HEAD_FILE, META_FILE, Evidence, FusionHead, FusionModel
from streams.console import progress
from streams.settings import defaults

if TYPE_CHECKING:
    from models.train import Pool

POINTER = "CURRENT"
MODEL_DIR_ENV = "CITYFUSE_MODEL_DIR"


@dataclass
class LearnConfig:
    """Hyper-parameters of one update (fixed before measuring; see scripts/learning_curve.py)."""

    steps: int = 100
    lr: float = 5e-4
    rehearsal_batch: int = 128
    feedback_batch: int = 32
    # Weight of cross-entropy on the rehearsal incidents' labels (0: rehearsal only through
    # distillation, which matches the previous head instead of refitting a small sample).
    rehearsal_ce: float = 1.0
    # Weight of the distillation term (KL to the previous head on rehearsal incidents).
    distill: float = 4.0
    distill_temperature: float = 2.0
    # The label bias, input weights and zero-shot weight are shared by every modality: when
    # frozen, feedback on one kind of evidence cannot shift what the others decide.
    # Both chosen on the validation groups' forgetting (scripts/learning_curve.py, README).
    train_shared: bool = False
    seed: int = 0


@dataclass
class Example:
    """One incident an operator labelled: its inputs (name -> (K, d)) and the label index."""

    x: dict[str, np.ndarray]
    label: int
    source: str = ""


def example_from_evidence(evidence: list[Evidence], label: int, source: str = "") -> Example:
    """The head's inputs for one incident's evidence (same grouping as at inference)."""
    x, _ = FusionModel.batch_inputs(evidence)
    return Example({k: v[0].numpy() for k, v in x.items()}, label, source)


def fits(example: Example, dims: dict[str, int]) -> bool:
    """Whether every input of ``example`` has the vector size the head expects (embeddings
    of another encoder version cannot be learned from)."""
    from models.fusion import INPUT_EXPERT

    return all(
        INPUT_EXPERT.get(name) in dims and arr.shape[1] == dims[INPUT_EXPERT[name]]
        for name, arr in example.x.items()
    )


def stack_examples(
    examples: list[Example],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Pad examples into the (B, K, d) tensors and (B, K) masks the head takes."""
    names = sorted({k for e in examples for k in e.x})
    x: dict[str, torch.Tensor] = {}
    mask: dict[str, torch.Tensor] = {}
    for name in names:
        dim = next(e.x[name].shape[1] for e in examples if name in e.x)
        k = max(e.x[name].shape[0] for e in examples if name in e.x)
        arr = np.zeros((len(examples), k, dim), dtype=np.float32)
        mk = np.zeros((len(examples), k), dtype=bool)
        for i, e in enumerate(examples):
            if name in e.x:
                n = e.x[name].shape[0]
                arr[i, :n] = e.x[name]
                mk[i, :n] = True
        x[name] = torch.from_numpy(arr)
        mask[name] = torch.from_numpy(mk)
    return x, mask, torch.tensor([e.label for e in examples])


def _merge(
    a: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
    b: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
    na: int,
    nb: int,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Concatenate two input batches along B, padding missing inputs and event slots."""
    x: dict[str, torch.Tensor] = {}
    mask: dict[str, torch.Tensor] = {}
    for name in sorted(set(a[0]) | set(b[0])):
        parts_x, parts_m = [], []
        ref = a[0].get(name, b[0].get(name))
        assert ref is not None
        k = max(t[0][name].shape[1] for t in (a, b) if name in t[0])
        for t, n in ((a, na), (b, nb)):
            if name in t[0]:
                xi, mi = t[0][name], t[1][name]
                pad = k - xi.shape[1]
                if pad:
                    xi = torch.cat([xi, torch.zeros(n, pad, xi.shape[2])], 1)
                    mi = torch.cat([mi, torch.zeros(n, pad, dtype=torch.bool)], 1)
            else:
                xi = torch.zeros(n, k, ref.shape[2])
                mi = torch.zeros(n, k, dtype=torch.bool)
            parts_x.append(xi)
            parts_m.append(mi)
        x[name] = torch.cat(parts_x)
        mask[name] = torch.cat(parts_m)
    return x, mask


def update_head(
    previous: FusionHead,
    examples: list[Example],
    rehearsal: dict[str, Pool],
    cfg: LearnConfig | None = None,
    show_progress: bool = True,
) -> FusionHead:
    """A new head: ``previous`` fine-tuned on ``examples`` with rehearsal and distillation."""
    from models.train import TrainConfig, sample_incidents

    cfg = cfg or LearnConfig()
    if not examples:
        raise ValueError("no feedback examples to learn from")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    teacher = previous.eval()
    head = copy.deepcopy(previous)
    head.train()
    shared = {"bias", "input_weight", "zero_shot_weight"}
    params = [p for name, p in head.named_parameters() if cfg.train_shared or name not in shared]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    fb_x, fb_mask, fb_y = stack_examples(examples)
    sample_cfg = TrainConfig()
    t = cfg.distill_temperature
    bar = progress() if show_progress else None
    task = bar.add_task("learn from feedback", total=cfg.steps) if bar else None
    with bar or contextlib.nullcontext():
        for _ in range(cfg.steps):
            rx, rmask, ry = sample_incidents(rehearsal, cfg.rehearsal_batch, rng, sample_cfg)
            pick = torch.from_numpy(rng.integers(0, len(examples), cfg.feedback_batch))
            fx = {k: v[pick] for k, v in fb_x.items()}
            fm = {k: v[pick] for k, v in fb_mask.items()}
            x, mask = _merge((rx, rmask), (fx, fm), len(ry), len(pick))
            logits = head(x, mask)
            n_r = len(ry)
            loss_r = torch.nn.functional.cross_entropy(logits[:n_r], ry)
            loss_f = torch.nn.functional.cross_entropy(logits[n_r:], fb_y[pick])
            with torch.no_grad():
                target = torch.softmax(teacher(rx, rmask) / t, -1)
            loss_kd = torch.nn.functional.kl_div(
                torch.log_softmax(logits[:n_r] / t, -1), target, reduction="batchmean"
            ) * (t * t)
            loss = cfg.rehearsal_ce * loss_r + loss_f + cfg.distill * loss_kd
            opt.zero_grad()
            loss.backward()
            opt.step()
            if bar is not None and task is not None:
                bar.advance(task)
    return head.eval()


# -- artifacts -------------------------------------------------------------------------------
def model_dir(given: Path | None = None) -> Path:
    """Where learned heads live: ``given``, ``$CITYFUSE_MODEL_DIR``, else configs/services.json."""
    if given is not None:
        return given
    env = os.environ.get(MODEL_DIR_ENV)
    return Path(env) if env else Path(defaults().learn.model_dir).expanduser()


def current_folder(folder: Path) -> Path | None:
    """The artifact folder the pointer names, if there is a valid one."""
    pointer = folder / POINTER
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    target = folder / name
    # The pointer names a direct subfolder only: never a path outside the model folder.
    if not name or "/" in name or name.startswith(".") or not (target / META_FILE).exists():
        return None
    return target


def load_current(folder: Path | None = None) -> FusionModel:
    """The head in service: the learned one the pointer names, else the shipped one."""
    found = current_folder(model_dir(folder))
    return FusionModel.load(found if found is not None else ARTIFACT_DIR)


def write_learned(
    head: FusionHead,
    previous: FusionModel,
    folder: Path,
    info: dict[str, Any],
    cfg: LearnConfig,
) -> FusionModel:
    """Save ``head`` as a new version under ``folder`` and point ``CURRENT`` at it."""
    created = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    version = f"fusion-learn-{created}"
    out = folder / version
    out.mkdir(parents=True, exist_ok=False)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out / HEAD_FILE))
    meta = dict(previous.meta)
    meta.update(
        {
            "version": version,
            "parent": previous.version,
            "learn": {"config": asdict(cfg), **info},
        }
    )
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    tmp = folder / f".{POINTER}.tmp"
    tmp.write_text(version + "\n", encoding="utf-8")
    tmp.replace(folder / POINTER)  # atomic: a reader sees the old or the new pointer
    return FusionModel.load(out)


@dataclass
class HeadWatcher:
    """Checks the model folder's pointer (at most every ``every_s``) for a new head."""

    folder: Path
    every_s: float = 1.0
    _seen: str | None = None
    _next: float = 0.0
    errors: list[str] = field(default_factory=list)

    @classmethod
    def default(cls) -> HeadWatcher:
        """Watch the configured model folder."""
        return cls(model_dir())

    def check(self) -> FusionModel | None:
        """A newly pointed-to head, loaded; None when nothing changed (or it failed to load)."""
        now = time.monotonic()
        if now < self._next:
            return None
        self._next = now + self.every_s
        found = current_folder(self.folder)
        if found is None or found.name == self._seen:
            return None
        self._seen = found.name
        try:
            return FusionModel.load(found)
        except Exception as e:  # a broken artifact must not stop the service: keep the old head
            self.errors.append(f"{found.name}: {type(e).__name__}: {e}")
            return None
