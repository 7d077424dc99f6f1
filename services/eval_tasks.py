"""``evaluate --task crisismmd-informative|crisismmd-humanitarian``: CrisisMMD text benchmark scores.

The recording's text events carry ``truth.crisismmd_informative`` or
``truth.crisismmd_humanitarian``. Every such event the text service accepted (offline or
through Kafka) is labelled by the task head: from its text, embedded by the CrisisMMD adapter
the head was fitted on, or, for a head without one, from the vector the service produced. The
scores go under ``per_modality.text[<task>]`` of the metrics JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.crisismmd import TaskModel, merge_label, scores, truth_key
from models.fusion import ARTIFACT_DIR
from models.text import FINETUNED_E5, TextEncoder
from streams.recording import read_recording

if TYPE_CHECKING:
    from services.evaluate import Row

TASK_CHOICES = ("crisismmd-informative", "crisismmd-humanitarian")


def score_task(folder: Path, rows: list[Row], task: str) -> dict[str, Any]:
    """Scores of ``task`` over the recording's text events that carry its truth field."""
    kind = task.removeprefix("crisismmd-")
    model = TaskModel.load(kind)
    key = truth_key(kind)
    _, events = read_recording(folder)
    truth_of = {
        str(e.message.get("event_id")): merge_label(kind, str(e.truth[key]))
        for e in events
        if e.truth and key in e.truth
    }
    text_of = {str(e.message.get("event_id")): str(e.message.get("text", "")) for e in events}
    picked = [
        r
        for r in rows
        if r.event_id in truth_of and r.evidence is not None and r.evidence.modality == "text"
    ]
    if not picked:
        raise ValueError(f"{folder}: no text event carries truth.{key}")
    if model.encoder_artifact:
        encoder = TextEncoder(FINETUNED_E5, artifact=str(ARTIFACT_DIR / model.encoder_artifact))
        vectors = encoder.encode([text_of[r.event_id] for r in picked])
    else:
        vectors = np.stack([r.evidence.vector for r in picked if r.evidence is not None])
    if vectors.shape[1] != model.meta["dim"]:
        raise ValueError(
            f"task head expects {model.meta['dim']}-d text vectors, the text encoder gives "
            f"{vectors.shape[1]}-d: retrain it (cityfuse train --tasks)"
        )
    truth = [truth_of[r.event_id] for r in picked]
    out = scores(truth, model.predict(vectors), model.classes)
    out["missing"] = len(truth_of) - len(picked)  # rejected or never embedded
    print_task(out, task)
    return out


def check_task(task: str) -> None:
    """Fail fast (before any model loads) on an unknown task or a missing task head."""
    if task not in TASK_CHOICES:
        raise ValueError(f"unknown task {task!r} (choose from {', '.join(TASK_CHOICES)})")
    model = TaskModel.load(task.removeprefix("crisismmd-"))
    if model.encoder_artifact and not (ARTIFACT_DIR / model.encoder_artifact).is_file():
        raise FileNotFoundError(
            f"{ARTIFACT_DIR / model.encoder_artifact}: the task head's CrisisMMD adapter is "
            "missing (build it: cityfuse train --tasks)"
        )


def print_task(result: dict[str, Any], task: str) -> None:
    """One rich table: the task's accuracy and macro-F1 with intervals, and per-class F1."""
    from streams.console import console, per_class_table

    console.print(
        per_class_table(f"{task} (text events with truth)", result["per_class"], first="class")
    )
    acc, f1 = result["accuracy"], result["macro_f1"]
    console.print(
        f"{task}: n={result['n']}, accuracy {acc['value']:.3f} [{acc['lo']:.3f}, {acc['hi']:.3f}], "
        f"macro-F1 {f1['value']:.3f} [{f1['lo']:.3f}, {f1['hi']:.3f}]"
    )
