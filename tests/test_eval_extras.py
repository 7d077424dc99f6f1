"""``evaluate``'s ablation, per_language and --task on a tiny recording written here."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import pytest

from models.crisismmd import CLASSES, TaskModel
from models.datasets import image_table
from models.splits import three_way
from services.evaluate import evaluate
from services.runtime import Models
from streams import topics
from streams.recording import Manifest, RecordingWriter
from streams.taxonomy import label_names

TEXTS = [
    # (incident, lang, text, label, crisismmd_informative)
    (
        "A",
        "en",
        "Huge fire in the warehouse, flames and black smoke over the roofs",
        "fire",
        "informative",
    ),
    (
        "B",
        "es",
        "Inundación en el centro, el agua cubre las calles y entra en las casas",
        "flood",
        "informative",
    ),
    (
        "C",
        "es",
        "Qué bonito día para ir a la playa con los amigos",
        "no_incident",
        "not_informative",
    ),
    (
        "D",
        "it",
        "Crollato il ponte sulla statale dopo il terremoto, strada chiusa",
        "infrastructure_damage",
        "informative",
    ),
]


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four incidents: two with a text and a frame (multi-modal), two text-only."""
    folder = tmp_path_factory.mktemp("rec") / "extras"
    images = image_table()
    images = images.filter(three_way(images, "image") == "test")
    frames = {lab: images.filter(images["label"] == lab)["path"][0] for lab in ("fire", "flood")}
    w = RecordingWriter(folder, Manifest(name="extras", labels=label_names()))
    base = {"schema_version": 1, "source": "test"}
    for i, (inc, lang, text, label, info) in enumerate(TEXTS):
        msg = {**base, "event_id": f"t{i}", "ts": f"2026-11-29T09:00:0{i}Z", "incident_id": inc}
        truth = {"label": label, "crisismmd_informative": info}
        w.add(float(i), topics.TEXT, {**msg, "text": text, "lang": lang}, truth)
        if label in frames:
            data = base64.b64encode(Path(frames[label]).read_bytes()).decode()
            media = {"content_type": "image/jpeg", "data_b64": data}
            frame = {**msg, "event_id": f"f{i}", "camera_id": f"c{i}", "media": media}
            w.add(i + 0.5, topics.FRAMES, frame, {"label": label})
    w.close()
    return folder


def test_ablation_per_language_and_task(recording: Path, models: Models, tmp_path: Path) -> None:
    result = evaluate(recording, tmp_path / "m.json", models=models, task="crisismmd-informative")
    abl = result["ablation"]
    assert abl["all"]["n"] == 2  # incidents A and B hold a text and a frame
    assert abl["text"]["alone"]["n"] == abl["image"]["alone"]["n"] == 2
    assert abl["audio"]["alone"]["n"] == 0
    for m in ("text", "image"):
        assert abl[m]["all"] == abl["all"]  # same incidents
        assert 0.0 <= abl[m]["alone"]["accuracy"] <= 1.0
    langs = result["per_language"]
    assert {k: v["n"] for k, v in langs.items()} == {"en": 1, "es": 2, "it": 1}
    task = result["per_modality"]["text"]["crisismmd-informative"]
    assert task["n"] == 4 and task["missing"] == 0
    assert set(task["per_class"]) == set(CLASSES["informative"])
    assert 0.0 <= task["accuracy"]["lo"] <= task["accuracy"]["value"] <= task["accuracy"]["hi"]


def test_task_heads_read_the_shipped_adapter_and_predict_known_classes() -> None:
    from models.fusion import ARTIFACT_DIR
    from models.text import FINETUNED_E5, TextEncoder

    for task in ("informative", "humanitarian"):
        head = TaskModel.load(task)
        assert head.encoder_artifact and (ARTIFACT_DIR / head.encoder_artifact).is_file()
        encoder = TextEncoder(FINETUNED_E5, artifact=head.encoder_artifact)
        assert encoder.version == head.meta["text_encoder"]  # the vectors it was fitted on
        vectors = encoder.encode([t[2] for t in TEXTS])
        assert head.meta["dim"] == vectors.shape[1]
        pred = head.predict(vectors)
        assert set(pred) <= set(CLASSES[task])
        if task == "informative":  # clear cases: three incidents and a day at the beach
            assert pred == [t[4] for t in TEXTS]


def test_missing_task_head_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cityfuse train --tasks"):
        TaskModel.load("informative", tmp_path)


def test_cli_rejects_an_unknown_task(recording: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "evaluate", str(recording), "--task", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
