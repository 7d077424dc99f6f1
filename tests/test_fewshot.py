"""Few-shot: a label held out of training is added back from its description and k examples."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from models.datasets import text_table
from models.fewshot import add_label, predict_with, prototype
from models.splits import three_way
from models.train import Pool, TrainConfig, single_inputs, train_head
from services.runtime import Models
from streams.taxonomy import label_names, labels


def test_prototype_blends_description_and_examples() -> None:
    d, e = np.array([1.0, 0.0]), np.array([[0.0, 1.0]] * 4)
    assert np.allclose(prototype(d, None), [1.0, 0.0])
    assert np.allclose(prototype(None, e), [0.0, 1.0])
    assert np.allclose(prototype(d, e), np.array([1.0, 1.0]) / np.sqrt(2))  # k = BLEND: equal
    assert prototype(None, None) is None


def test_a_held_out_label_is_added_without_retraining(models: Models) -> None:
    names = label_names()
    fire = names.index("fire")
    df = text_table()
    split = three_way(df, "text")
    train_df = pl.concat(
        [
            df.filter((split == "train") & (pl.col("label") == lab)).head(15)
            for lab in names
            if lab != "fire"
        ]
    )
    fire_train = df.filter((split == "train") & (pl.col("label") == "fire")).head(4)
    fire_val = df.filter((split == "val") & (pl.col("label") == "fire")).sample(20, seed=0)

    def vec(d: pl.DataFrame) -> np.ndarray:
        return models.text.encode(d["text"].to_list())

    y = np.array([names.index(v) for v in train_df["label"]])
    train = {"text": Pool({"text": vec(train_df)}, y)}
    head = train_head(train, TrainConfig(steps=120, batch=64))
    val = Pool({"text": vec(fire_val)}, np.full(len(fire_val), fire))
    x, mask = single_inputs(val)
    with torch.inference_mode():
        before = head(x, mask).argmax(-1).tolist()
    assert fire not in before  # never a training target: the head cannot say fire

    description = models.text.encode(
        [next(la.description for la in labels() if la.name == "fire")]
    )[0]
    new = add_label("fire", description, {"text": vec(fire_train)}, train["text"].x)
    after = predict_with(head, new, fire, x, mask)
    assert after.count("fire") >= len(after) // 2  # unseen-event fire reports found (k = 4)
    known = Pool({"text": train["text"].x["text"]}, y)
    kept = predict_with(head, new, fire, *single_inputs(known))
    assert kept.count("fire") <= 0.1 * len(kept)  # known-label reports mostly stay known
