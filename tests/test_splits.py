"""Three-way grouped splits: no group in two splits, and calls share no voice or sentence."""

from __future__ import annotations

import json

import polars as pl

from models.datasets import audio_table, image_table, text_table
from models.splits import grouped_split, three_way
from streams.taxonomy import CONFIG_DIR


def _groups(df: pl.DataFrame, split: pl.Series, name: str, col: str = "group") -> set[str]:
    return set(df.filter(split == name)[col].unique().to_list())


def test_text_and_image_groups_sit_in_exactly_one_split() -> None:
    for df, modality in ((text_table(), "text"), (image_table(), "image")):
        split = three_way(df, modality)
        assert set(split.unique()) == {"train", "val", "test"}
        tr, va, te = (_groups(df, split, s) for s in ("train", "val", "test"))
        assert not (tr & va) and not (tr & te) and not (va & te), modality
        # val = the groups already spent on choices (grouped_split, salt cityfuse-v1)
        assert va == set(df.filter(grouped_split(df))["group"].unique().to_list()) - te


def test_text_test_events_are_the_configured_ones() -> None:
    df = text_table()
    config = json.loads((CONFIG_DIR / "splits.json").read_text())
    assert _groups(df, three_way(df, "text"), "test") == set(config["text_test_groups"])


def test_calls_share_no_voice_or_sentence_across_splits() -> None:
    df = audio_table()
    split = three_way(df, "audio")
    tr_v, va_v, te_v = (_groups(df, split, s) for s in ("train", "val", "test"))
    tr_s, va_s, te_s = (_groups(df, split, s, "sentence_id") for s in ("train", "val", "test"))
    assert tr_v and va_v and te_v
    assert not (tr_v & va_v) and not (tr_v & te_v) and not (va_v & te_v)
    assert not (tr_s & va_s) and not (tr_s & te_s) and not (va_s & te_s)


def test_cross_validation_folds_keep_groups_whole_and_spread_cctv_videos() -> None:
    from models.splits import grouped_folds

    df = image_table()
    df = df.filter(three_way(df, "image") != "test")  # cross-validation never sees test
    folds = grouped_folds(df, 5)
    assert sorted(folds.unique().to_list()) == [0, 1, 2, 3, 4]
    per_group = df.with_columns(folds).group_by("group").agg(pl.col("fold").n_unique())
    assert per_group["fold"].max() == 1  # a group sits in one fold
    cctv = df.with_columns(folds).filter(pl.col("group").str.starts_with("ckay16_"))
    assert cctv["fold"].n_unique() == 5  # every fold holds out some CCTV videos
    # Deterministic: the same salt deals the same folds.
    assert grouped_folds(df, 5).equals(folds)
