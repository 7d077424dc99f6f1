"""The fine-tuned vision encoder: shipped artifact, one real fine-tuning step, camera reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch

from models.camera_reference import CameraReferences, ReferenceBounds
from models.datasets import image_table
from models.finetune_vision import METHODS_FILE, augmenter, class_weights
from models.images import decode_image
from models.vision import (
    ARTIFACT_DIR,
    VisionEncoder,
    adapt,
    build_backbone,
    normalise,
    selection,
)
from streams.taxonomy import label_names


def _frames(df: pl.DataFrame) -> list[Any]:
    return [decode_image(Path(p).read_bytes()) for p in df["path"]]


def _camera(n: int) -> pl.DataFrame:
    """The first ``n`` frames, in order, of one CCTV camera with normal then accident frames."""
    df = image_table().filter(pl.col("camera_id") == "ckay16_test16")
    return df.sort(pl.col("frame_index").cast(pl.Int64)).head(n)


def shipped() -> str:
    """The configured default artifact, else the best-on-val one named in the methods file."""
    artifact = selection().get("artifact")
    if artifact:
        return str(artifact)
    table = json.loads((ARTIFACT_DIR / METHODS_FILE).read_text())
    return str(table["best_val"]["artifact"])


@pytest.fixture(scope="module")
def encoder() -> VisionEncoder:
    """The shipped fine-tuned encoder with its camera reference."""
    return VisionEncoder(shipped(), camera_reference=True)


def test_shipped_artifact_loads_and_embeds_real_frames(encoder: VisionEncoder) -> None:
    enc = encoder
    artifact = shipped()
    assert (ARTIFACT_DIR / artifact).stat().st_size <= 25 * 1024 * 1024
    assert enc.artifact == artifact and Path(artifact).stem in enc.version
    df = image_table().filter(pl.col("path").str.contains("cairfire_00"))
    vecs = enc.encode(_frames(df.head(3)))
    assert vecs.shape == (3, enc.dim) and np.isfinite(vecs).all()
    # The artifact's own classifier reads a fire photo as fire.
    _, probs = enc.scores(_frames(df.head(3)))
    assert (probs.argmax(-1) == label_names().index("fire")).sum() >= 2


def test_one_finetuning_step_on_real_frames_changes_trainable_weights() -> None:
    torch.manual_seed(0)
    df = pl.concat([_camera(2), image_table().filter(pl.col("label") == "flood").head(2)])
    model = adapt(build_backbone(), "lora")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    aug = augmenter()
    x = normalise(
        torch.stack([aug(torch.from_numpy(np.array(img)).permute(2, 0, 1)) for img in _frames(df)])
    )
    y = torch.tensor([label_names().index(v) for v in df["label"]])
    opt = torch.optim.AdamW(trainable.values(), lr=1e-3, weight_decay=0.0)
    model.eval()
    loss = torch.nn.functional.cross_entropy(
        model(x), y, weight=class_weights(y.numpy(), len(label_names()))
    )
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    changed = {n for n, p in trainable.items() if not torch.equal(p.detach(), before[n])}
    # LoRA B starts at zero, so A gets no gradient on the first step; B and the classifier do.
    moved = {n for n, p in trainable.items() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("lora_B" in n for n in moved) and any(n.startswith("classifier") for n in moved)
    assert moved <= changed
    assert all(
        torch.equal(p.detach(), frozen[n]) for n, p in model.named_parameters() if n in frozen
    )


def test_camera_reference_is_bounded_and_relative(encoder: VisionEncoder) -> None:
    feats, _ = encoder.scores(_frames(_camera(4)))
    refs = CameraReferences(ReferenceBounds(max_cameras=2, window=2, rule="recent"))
    first = refs.relative("cam-a", feats[0], 1.0)
    # No reference yet: the difference half is zero.
    assert np.array_equal(first[:1280], feats[0]) and not first[1280:].any()
    second = refs.relative("cam-a", feats[1], 1.0)
    assert np.allclose(second[1280:], feats[1] - feats[0], atol=1e-6)
    assert np.abs(second[1280:]).sum() > 0
    for f in feats[2:]:
        refs.relative("cam-a", f, 1.0)
    ref = refs.reference("cam-a")
    assert ref is not None and np.allclose(ref, feats[2:].mean(0), atol=1e-6)  # window of 2
    refs.relative("cam-b", feats[0], 1.0)
    refs.relative("cam-c", feats[0], 1.0)
    assert len(refs) == 2 and refs.reference("cam-a") is None  # least recently seen evicted
    # Still photos (no camera id) never get a reference.
    assert not refs.relative(None, feats[3], 1.0)[1280:].any()
    # Rule "confident": frames the model doubts are not taken into the reference.
    strict = CameraReferences(ReferenceBounds(window=4, min_p_ordinary=0.8, rule="confident"))
    strict.relative("cam", feats[0], 0.3)
    assert strict.reference("cam") is None
    strict.relative("cam", feats[1], 0.9)
    assert np.allclose(strict.reference("cam"), feats[1])  # type: ignore[arg-type]


def test_an_int8_stored_artifact_loads_strictly_and_keeps_the_labels(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from models.vision import (
        frame_views,
        load_artifact,
        pooled,
        quantise_int8,
        trainable_state,
    )
    from models.weights import EFFNET_LITE0_SHA256, SHIP_BYTES

    torch.manual_seed(0)
    model = adapt(build_backbone(), "top").eval()
    with torch.no_grad():  # a trained-looking classifier: not the zero-ish initial one
        for p in model.classifier.parameters():
            p.normal_(0, 0.05)
    state = trainable_state(model)
    fp32_bytes = sum(t.numel() * t.element_size() for t in state.values())
    assert fp32_bytes > SHIP_BYTES  # the method that needs int8 storage
    meta = {
        "method": "top",
        "labels": json.dumps(label_names()),
        "base_sha256": EFFNET_LITE0_SHA256,
    }
    path = tmp_path / "vision_top.safetensors"
    save_file(quantise_int8(state), str(path), metadata=meta)
    assert path.stat().st_size <= SHIP_BYTES
    loaded, _ = load_artifact(path)
    df = pl.concat([_camera(2), image_table().filter(pl.col("label") == "fire").head(2)])
    x = normalise(frame_views(_frames(df)))
    with torch.no_grad():
        a, b = pooled(model, x), pooled(loaded, x)
        same = (model.classifier(a).argmax(1) == loaded.classifier(b).argmax(1)).all()
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99 and bool(same)


def test_an_artifact_trained_on_whole_frames_makes_the_encoder_read_whole_frames(
    tmp_path: Path,
) -> None:
    from PIL import Image

    from models.finetune_vision import FinetuneConfig, save_artifact
    from models.vision import frame_views

    # A wide frame whose only red is at its left edge: outside the centre square.
    pixels = np.zeros((256, 455, 3), dtype=np.uint8)
    pixels[:, :60, 0] = 255
    frame = Image.fromarray(pixels)
    assert frame_views([frame], view="crop")[0, 0].max() == 0
    assert frame_views([frame], view="squash")[0, 0, :, :20].min() > 200
    model = adapt(build_backbone(), "head")
    path = save_artifact(model, FinetuneConfig("head", 1, 1e-3, view="squash"), tmp_path)
    assert path.name == "vision_head-sq.safetensors"
    enc = VisionEncoder(str(path), camera_reference=False)
    assert enc.view == "squash"
    assert torch.equal(enc.preprocess([frame]), normalise(frame_views([frame], view="squash")))
