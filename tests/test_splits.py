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


def test_cross_fit_folds_partition_the_pool_by_whole_groups() -> None:
    """Each fold encoder trains on its pool less one fold, and that fold's groups (voices for
    calls) are new to it; test never enters a pool."""
    from models.splits import CROSSFIT_POOLS, crossfit_fit_on, crossfit_fold, fit_rows, in_pool

    for table, modality in ((text_table, "text"), (image_table, "image"), (audio_table, "audio")):
        df = table()
        split = three_way(df, modality)
        test_groups = _groups(df, split, "test")
        for pool in CROSSFIT_POOLS:
            inside = in_pool(df, modality, pool)
            fold = crossfit_fold(df, modality, pool, 2)
            assert ((fold >= 0) == inside).all(), (modality, pool)
            assert not (set(df.filter(inside)["group"].unique().to_list()) & test_groups)
            for held in (0, 1):
                fitted = fit_rows(df, modality, crossfit_fit_on(pool, held, 2))
                held_rows = fold == held
                assert not (fitted & held_rows).any()
                assert ((fitted | held_rows) == inside).all()
                seen = set(df.filter(fitted)["group"].unique().to_list())
                assert not (seen & set(df.filter(held_rows)["group"].unique().to_list()))
                # balanced: neither fold encoder learns from less than a third of the pool
                assert fitted.sum() > inside.sum() / 3, (modality, pool, held)


def test_fit_on_names_are_checked_and_name_the_artifact() -> None:
    import pytest

    from models.splits import fit_suffix, is_fold, parse_fit_on

    assert parse_fit_on("train+val-cf1of2") == ("train+val", 1, 2)
    assert is_fold("train-cf0of2") and not is_fold("train+val")
    assert [fit_suffix(f) for f in ("train", "train+val", "train-cf0of2", "train+val-cf1of2")] == [
        "",
        "-tv",
        "-tr-cf0of2",
        "-tv-cf1of2",
    ]
    for bad in ("test", "train-cf2of2", "val", "train+val-cf0of1"):
        with pytest.raises(ValueError):
            parse_fit_on(bad)


def test_splits_and_folds_are_the_same_in_every_run() -> None:
    """Two image groups hold as many fight as normal frames; their majority label must not
    depend on hash order, or a frame moves between train and test from run to run."""
    from models.splits import crossfit_fold

    df = image_table()
    first = three_way(df, "image")
    assert (first.filter(df["group"] == "quake_intact_132") == "train").all()
    for _ in range(10):
        assert three_way(df, "image").equals(first)
        assert crossfit_fold(df, "image", "train+val", 2).equals(
            crossfit_fold(df, "image", "train+val", 2)
        )


def test_a_new_test_score_keeps_every_earlier_look_on_record() -> None:
    from models.metrics import record_test

    doc = record_test({}, {"method": "a", "f1": 0.5}, "method")
    assert doc == {"test": {"method": "a", "f1": 0.5}}
    doc = record_test(doc, {"method": "a", "f1": 0.6}, "method")  # the same model, rescored
    assert "earlier_tests" not in doc and doc["test"]["f1"] == 0.6
    doc = record_test(doc, {"method": "b", "f1": 0.7}, "method")
    doc = record_test(doc, {"method": "c", "f1": 0.8}, "method")
    assert [t["method"] for t in doc["earlier_tests"]] == ["a", "b"]
    assert doc["test"]["method"] == "c"
