"""Continual learning end to end: feedback on the real broker -> ``learn`` -> a new head
version, picked up by a running fusion service without a restart."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch

from models.continual import POINTER, LearnConfig, stack_examples
from models.fusion import ARTIFACT_DIR, HEAD_FILE, FusionModel
from services.fusion import FusionService
from services.learn import collect, learn
from streams import topics
from streams.clients import KafkaSettings
from streams.schemas import Alert, Embedding, EncoderRef, Feedback, encode_vector, utc_now
from streams.serde import to_bytes
from streams.taxonomy import label_index, label_names
from tests.kafka_helpers import reader, send, wait_for

RUN = uuid.uuid4().hex[:8]
REPORTS = {
    "fire": "the warehouse next to the station is burning, thick black smoke everywhere",
    "flood": "water is knee deep on the high street after the river burst its banks",
}


def _rehearsal(models: Any) -> dict[str, Any]:
    """A small real rehearsal pool: training-split reports of every label, embedded now."""
    from models.datasets import text_table
    from models.splits import three_way
    from models.train import Pool

    df = text_table()
    df = df.filter(three_way(df, "text") == "train")
    rows = pl.concat([df.filter(pl.col("label") == lab).head(12) for lab in label_names()])
    x = models.text.encode(rows["text"].to_list())
    y = np.array([label_index(v) for v in rows["label"]], dtype=np.int64)
    return {"text": Pool({"text": x}, y)}


def _embedding(models: Any, event_id: str, key: str, text: str) -> Embedding:
    v = models.text.encode([text])[0]
    return Embedding(
        event_id=event_id,
        modality="text",
        correlation_key=key,
        ts=utc_now(),
        vector=encode_vector(v),
        dim=v.shape[0],
        encoder=EncoderRef(name=models.text.name, version=models.text.version),
        ingest_ts=utc_now(),
    )


def _alert(emb: Embedding, label: str) -> Alert:
    return Alert(
        alert_id=f"a-{emb.event_id}",
        version=1,
        incident_id=emb.correlation_key,
        correlation_key=emb.correlation_key,
        label=label,
        confidence=0.5,
        probs={label: 0.5},
        modalities=["text"],
        contributions={"text": 0.5},
        evidence=[emb.event_id],
        first_event_ts=emb.ts,
        emitted_ts=utc_now(),
        model_version="shipped",
    )


def test_learn_writes_a_new_head_that_fusion_picks_up_live(
    settings: KafkaSettings, models: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CITYFUSE_MODEL_DIR", str(tmp_path))
    shipped = hashlib.sha256((ARTIFACT_DIR / HEAD_FILE).read_bytes()).hexdigest()
    # Two incidents the operators judged: one relabelled (the head said flood), one confirmed.
    fire = _embedding(models, f"e-fire-{RUN}", f"k-fire-{RUN}", REPORTS["fire"])
    flood = _embedding(models, f"e-flood-{RUN}", f"k-flood-{RUN}", REPORTS["flood"])
    for emb, said in ((fire, "flood"), (flood, "flood")):
        send(settings, topics.EMBEDDINGS, to_bytes(emb), key=emb.correlation_key)
        send(settings, topics.ALERTS, to_bytes(_alert(emb, said)), key=f"a-{emb.event_id}")
    verdicts = [
        (fire, "confirm", "flood"),  # first verdict on this alert ...
        (fire, "relabel", "fire"),  # ... is replaced by the later one
        (flood, "confirm", "flood"),
    ]
    for emb, action, label in verdicts:
        fb = Feedback(
            operator="ana",
            alert_id=f"a-{emb.event_id}",
            version=1,
            action=action,  # type: ignore[arg-type]
            label=label,
            ts=utc_now(),
        )
        send(settings, topics.FEEDBACK, to_bytes(fb), key=fb.alert_id)
    send(settings, topics.FEEDBACK, b'{"not": "feedback"}')

    found = collect(settings)
    mine = {e.source: e for e in found.examples if RUN in e.source}
    assert set(mine) == {f"a-{fire.event_id}@v1", f"a-{flood.event_id}@v1"}
    assert mine[f"a-{fire.event_id}@v1"].label == label_index("fire")
    assert found.skipped.get("feedback_invalid", 0) >= 1

    # A fusion service already running on the shipped head.
    stop = threading.Event()
    svc = FusionService(settings, models.fusion, stop, pending_s=0.3, group_id=f"learn-{RUN}")
    thread = threading.Thread(target=svc.run, daemon=True)
    thread.start()
    try:
        assert svc.ready.wait(60)
        result = learn(
            settings, None, LearnConfig(steps=40, rehearsal_batch=64), _rehearsal(models)
        )
        new_version = result["version"]
        assert (tmp_path / POINTER).read_text().strip() == new_version
        assert new_version != models.fusion.version
        assert hashlib.sha256((ARTIFACT_DIR / HEAD_FILE).read_bytes()).hexdigest() == shipped

        # The new head moved towards the operators' label on the relabelled incident.
        learned = FusionModel.load(tmp_path / new_version)
        x, mask, _ = stack_examples([mine[f"a-{fire.event_id}@v1"]])
        fire_i = label_index("fire")
        with torch.no_grad():
            before = torch.softmax(models.fusion.head(x, mask), -1)[0, fire_i].item()
            after = torch.softmax(learned.head(x, mask), -1)[0, fire_i].item()
        assert after > before

        # New evidence after the update is labelled by the new head, without a restart.
        time.sleep(1.5)  # the watcher looks at the pointer at most once a second
        fresh = _embedding(models, f"e-new-{RUN}", f"k-new-{RUN}", REPORTS["fire"])
        consumer = reader(settings, topics.ALERTS)
        send(settings, topics.EMBEDDINGS, to_bytes(fresh), key=fresh.correlation_key)
        got = wait_for(consumer, lambda v: fresh.event_id in v.get("evidence", []), timeout=60)
        consumer.close()
        assert got and all(a["model_version"] == new_version for a in got)
    finally:
        stop.set()
        thread.join(30)


def test_update_changes_only_what_is_configured_and_anchors_hold() -> None:
    """The parameter subset, EWC/L2-SP anchors and early stopping (no broker needed)."""
    from models.continual import Example, update_head
    from models.fusion import FusionHead
    from models.train import Pool

    rng = np.random.default_rng(0)
    n_labels = len(label_names())
    pools = {
        "text": Pool(
            {"text": rng.normal(size=(200, 384)).astype(np.float32)}, rng.integers(0, n_labels, 200)
        ),
        "image": Pool(
            {"image": rng.normal(size=(100, 64)).astype(np.float32)}, rng.integers(0, n_labels, 100)
        ),
    }
    head = FusionHead({"text": 384, "image": 64, "audio": 32}, n_labels, 32, 0.5).eval()
    examples = [
        Example({"text": rng.normal(size=(1, 384)).astype(np.float32)}, 1) for _ in range(5)
    ]

    def changed(cfg: LearnConfig) -> tuple[set[str], dict[str, Any]]:
        info: dict[str, Any] = {}
        new = update_head(head, examples, pools, cfg, show_progress=False, info=info)
        old = dict(head.named_parameters())
        return {k for k, p in new.named_parameters() if not torch.equal(p, old[k])}, info

    out, _ = changed(LearnConfig(steps=5, trainable="feedback_output", ewc=1.0, l2sp=0.1))
    assert out == {"experts.text.4.weight", "experts.text.4.bias"}
    out, _ = changed(LearnConfig(steps=5, trainable="experts"))
    assert "bias" not in out and any(k.startswith("experts.image.") for k in out)
    # Early stopping that tolerates no rise at all keeps the previous head when the first
    # check finds the held-out rehearsal loss higher.
    out, info = changed(LearnConfig(steps=20, lr=1e-2, holdout=0.2, check_every=5, stop_rise=-1.0))
    assert info["early_stopped"] and info["steps_run"] == 5 and out == set()
