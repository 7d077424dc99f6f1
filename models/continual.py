"""Continual learning of the fusion head from operator feedback, without forgetting.

An update starts from the head in service and fine-tunes a copy on:
- the incidents operators gave a verdict on (their label is the target),
- rehearsal: synthetic incidents drawn from the training pools (models/train.py),
- distillation: on the same rehearsal incidents, the new head's softened output is pulled
  towards the previous head's (Learning without Forgetting), so what the head knew
  elsewhere is kept while it learns the new event;
- optionally anchors on the weights themselves (L2-SP, or EWC with a Fisher estimate from
  the rehearsal data), a subset of parameters to update, and early stopping on held-out
  rehearsal loss. Which of these are on is configured (configs/services.json
  ``learn.update``), as chosen by ``scripts/learning_curve.py --select``.
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
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from safetensors.torch import save_file

from models.fusion import ARTIFACT_DIR, HEAD_FILE, META_FILE, Evidence, FusionHead, FusionModel
from streams.console import progress
from streams.settings import LearnUpdate, defaults

if TYPE_CHECKING:
    from models.train import Pool

POINTER = "CURRENT"
MODEL_DIR_ENV = "CITYFUSE_MODEL_DIR"


def _configured() -> LearnUpdate:
    return defaults().learn.update


@dataclass
class LearnConfig:
    """Hyper-parameters of one update. Defaults: ``configs/services.json`` -> ``learn.update``
    (their only home), chosen on the selection split of ``scripts/learning_curve.py --select``
    (README, "Continual learning"); a field given here overrides the configured value."""

    steps: int = field(default_factory=lambda: _configured().steps)
    lr: float = field(default_factory=lambda: _configured().lr)
    rehearsal_batch: int = field(default_factory=lambda: _configured().rehearsal_batch)
    feedback_batch: int = field(default_factory=lambda: _configured().feedback_batch)
    # Weight of cross-entropy on the rehearsal incidents' labels (0: rehearsal only through
    # distillation, which matches the previous head instead of refitting a sample).
    rehearsal_ce: float = field(default_factory=lambda: _configured().rehearsal_ce)
    # Share of rehearsal incidents that are a single modality (as in training: 0.4); the
    # rest mix modalities.
    rehearsal_p_single: float = field(default_factory=lambda: _configured().rehearsal_p_single)
    # Weight of the distillation term (KL to the previous head on rehearsal incidents).
    distill: float = field(default_factory=lambda: _configured().distill)
    distill_temperature: float = field(default_factory=lambda: _configured().distill_temperature)
    # L2-SP: weight of sum((w - w_prev)^2) over the trained parameters.
    l2sp: float = field(default_factory=lambda: _configured().l2sp)
    # EWC: weight of sum(F * (w - w_prev)^2), F the diagonal Fisher of the previous head on
    # ``fisher_samples`` rehearsal incidents (labels drawn from its own prediction),
    # normalised to mean 1 over the trained parameters (so the weight compares with l2sp).
    ewc: float = field(default_factory=lambda: _configured().ewc)
    fisher_samples: int = field(default_factory=lambda: _configured().fisher_samples)
    # What is updated: "all" parameters; "experts" (the label bias, input weights and
    # zero-shot weight are shared by every modality and stay frozen); "feedback_experts"
    # (only the experts the feedback's inputs go through); "feedback_output" (only their
    # last layer).
    trainable: Literal["all", "experts", "feedback_experts", "feedback_output"] = field(
        default_factory=lambda: _configured().trainable
    )
    # Dropout while updating (the head's training dropout); off: the student starts exactly
    # at the previous head, so distillation and the anchors start at zero.
    dropout: bool = field(default_factory=lambda: _configured().dropout)
    # Early stopping: this share of the rehearsal rows is held out of replay; every
    # ``check_every`` steps the held-out rehearsal loss (cross-entropy) is measured, and
    # when it has risen more than ``stop_rise`` (nats) above the previous head's, the update
    # stops and keeps the last state that was within it. 0: off.
    holdout: float = field(default_factory=lambda: _configured().holdout)
    check_every: int = field(default_factory=lambda: _configured().check_every)
    stop_rise: float = field(default_factory=lambda: _configured().stop_rise)
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


def trained_parameters(
    head: FusionHead, cfg: LearnConfig, examples: list[Example]
) -> dict[str, torch.nn.Parameter]:
    """The parameters an update changes (``cfg.trainable``); the others stay as they were."""
    shared = {"bias", "input_weight", "zero_shot_weight"}
    experts = {x for e in examples for name in e.x for x in head.experts_of(name)}
    out: dict[str, torch.nn.Parameter] = {}
    for name, p in head.named_parameters():
        if cfg.trainable == "all":
            out[name] = p
        elif name in shared:
            continue
        elif cfg.trainable == "experts":
            out[name] = p
        else:
            expert = name.split(".")[1]
            if expert not in experts:
                continue
            last = max(  # the index of the expert's output Linear
                int(n.split(".")[2])
                for n, _ in head.named_parameters()
                if n.startswith(f"experts.{expert}.")
            )
            if cfg.trainable == "feedback_experts" or name.split(".")[2] == str(last):
                out[name] = p
    return out


def fisher_diagonal(
    head: FusionHead,
    params: dict[str, torch.nn.Parameter],
    rehearsal: dict[str, Pool],
    n: int,
    rng: np.random.Generator,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of ``head`` on ``n`` rehearsal incidents (labels drawn from its own
    prediction), normalised to mean 1 over ``params``."""
    from models.train import TrainConfig, sample_incidents

    x, mask, _ = sample_incidents(rehearsal, n, rng, TrainConfig(), augment=False)
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    head.eval()
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    for i in range(n):
        xi = {k: v[i : i + 1] for k, v in x.items()}
        mi = {k: v[i : i + 1] for k, v in mask.items()}
        logp = torch.log_softmax(head(xi, mi), -1)[0]
        y = torch.multinomial(logp.detach().exp(), 1, generator=gen)[0]
        grads = torch.autograd.grad(logp[y], list(params.values()), allow_unused=True)
        for k, g in zip(params, grads, strict=True):
            if g is not None:
                fisher[k] += g.detach() ** 2 / n
    mean = torch.cat([f.flatten() for f in fisher.values()]).mean().clamp(min=1e-12)
    return {k: f / mean for k, f in fisher.items()}


def split_pools(
    pools: dict[str, Pool], share: float, rng: np.random.Generator
) -> tuple[dict[str, Pool], dict[str, Pool]]:
    """(replayed, held out): ``share`` of each modality's rows held out at random."""
    kept, held = {}, {}
    for m, pool in pools.items():
        out = rng.random(len(pool.y)) < share
        kept[m], held[m] = pool.subset(~out), pool.subset(out)
    return kept, held


@torch.no_grad()
def rehearsal_loss(
    head: FusionHead,
    fixed: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]],
) -> float:
    """Mean cross-entropy over fixed held-out rehearsal batches."""
    head.eval()
    losses = [torch.nn.functional.cross_entropy(head(x, m), y).item() for x, m, y in fixed]
    return float(np.mean(losses))


def update_head(
    previous: FusionHead,
    examples: list[Example],
    rehearsal: dict[str, Pool],
    cfg: LearnConfig | None = None,
    show_progress: bool = True,
    info: dict[str, Any] | None = None,
) -> FusionHead:
    """A new head: ``previous`` fine-tuned on ``examples`` with rehearsal, distillation and
    the configured anchors; ``info`` (if given) receives what the update did."""
    from models.train import TrainConfig, sample_incidents, single_inputs

    cfg = cfg or LearnConfig()
    if not examples:
        raise ValueError("no feedback examples to learn from")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    teacher = copy.deepcopy(previous).eval()
    head = copy.deepcopy(previous)
    params = trained_parameters(head, cfg, examples)
    for p in head.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    anchor = {k: p.detach().clone() for k, p in params.items()}
    replay = rehearsal
    fixed: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]] = []
    if cfg.holdout > 0:
        replay, held = split_pools(rehearsal, cfg.holdout, rng)
        fixed.append(sample_incidents(held, 1024, rng, TrainConfig(), augment=False))
        for pool in held.values():
            if len(pool.y):
                fixed.append((*single_inputs(pool), torch.from_numpy(pool.y)))
    weight: dict[str, torch.Tensor] = {}
    if cfg.ewc > 0:
        fisher = fisher_diagonal(head, params, replay, cfg.fisher_samples, rng)
        weight = {k: cfg.ewc * f for k, f in fisher.items()}
    if cfg.l2sp > 0:
        weight = {k: weight.get(k, torch.zeros(())) + cfg.l2sp for k in params}
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=0.0)
    fb_x, fb_mask, fb_y = stack_examples(examples)
    sample_cfg = TrainConfig(p_single=cfg.rehearsal_p_single)
    t = cfg.distill_temperature
    base_loss = rehearsal_loss(head, fixed) if fixed else 0.0
    kept = copy.deepcopy(head.state_dict())
    done, stopped, last_loss = 0, False, base_loss
    bar = progress() if show_progress else None
    task = bar.add_task("learn from feedback", total=cfg.steps) if bar else None
    with bar or contextlib.nullcontext():
        for step in range(cfg.steps):
            head.train(cfg.dropout)
            rx, rmask, ry = sample_incidents(replay, cfg.rehearsal_batch, rng, sample_cfg)
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
            for k, w in weight.items():
                loss = loss + (w * (params[k] - anchor[k]) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            done = step + 1
            if bar is not None and task is not None:
                bar.advance(task)
            if fixed and (done % cfg.check_every == 0 or done == cfg.steps):
                last_loss = rehearsal_loss(head, fixed)
                if last_loss > base_loss + cfg.stop_rise:
                    head.load_state_dict(kept)
                    stopped = True
                    break
                kept = copy.deepcopy(head.state_dict())
    for p in head.parameters():
        p.requires_grad_(True)
    if info is not None:
        info.update(
            {
                "steps_run": done,
                "early_stopped": stopped,
                "trained_parameters": sorted(params),
                "holdout_loss_before": base_loss if fixed else None,
                "holdout_loss_last": last_loss if fixed else None,
            }
        )
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
