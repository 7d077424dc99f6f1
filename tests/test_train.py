"""The training pipeline on a tiny real slice: learns, validates on held-out groups, round-trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch

from models.datasets import image_table, text_table
from models.fusion import Evidence, FusionModel
from models.images import decode_image
from models.splits import grouped_split
from models.train import Pool, TrainConfig, evaluate_head, train_head, write_artifact
from services.runtime import Models
from streams.taxonomy import label_names


def _slice(df: pl.DataFrame, per_label: int) -> pl.DataFrame:
    return pl.concat([df.filter(pl.col("label") == lab).head(per_label) for lab in label_names()])


def test_tiny_training_run_learns_and_round_trips(models: Models, tmp_path: Path) -> None:
    names = label_names()
    texts, images = text_table(), image_table()
    t_val, i_val = grouped_split(texts), grouped_split(images)
    t_train = _slice(texts.filter(~t_val).sample(fraction=1.0, seed=0, shuffle=True), 12)
    i_train = _slice(images.filter(~i_val), 4)
    i_test = _slice(images.filter(i_val), 2)
    assert set(t_train["group"]).isdisjoint(set(texts.filter(t_val)["group"]))

    def pool(df: pl.DataFrame, name: str) -> Pool:
        if name == "text":
            x = models.text.encode(df["text"].to_list())
        else:
            x = models.vision.encode([decode_image(Path(p).read_bytes()) for p in df["path"]])
        return Pool({name: x}, np.array([names.index(v) for v in df["label"]]))

    train = {"text": pool(t_train, "text"), "image": pool(i_train, "image")}
    cfg = TrainConfig(steps=150, batch=64)
    head = train_head(train, cfg)
    report, _, _ = evaluate_head(head, train | {"image": pool(i_test, "image")}, cfg, n_fused=200)
    assert report["text"]["accuracy"] > 0.6  # type: ignore[index]  # fits its training slice (chance 0.14)
    assert report["image"]["n"] == len(i_test)  # type: ignore[index]  # scored on held-out groups
    report["calibration"] = {"temperature": 1.0, "ece_before": 0.0, "ece_after": 0.0}
    info = {
        "train_rows": {"text": len(t_train)},
        "val_rows": {"image": len(i_test)},
        "text_val_groups": [],
    }
    write_artifact(head, cfg, report, info, tmp_path)
    loaded = FusionModel.load(tmp_path)
    assert (tmp_path / "MODEL_CARD.md").read_text().startswith("# Model card")
    ev = [Evidence("text", train["text"].x["text"][0])]
    with torch.inference_mode():
        expected = names[int(head(*FusionModel.batch_inputs(ev)).argmax())]
    assert loaded.predict(ev).label == expected
