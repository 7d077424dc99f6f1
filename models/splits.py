"""Grouped train/validation splits: whole groups (events, videos, voices) are held out.

The choice is a pure function of the group names (a hash), so every script, test and
the demo recording agree on which samples are validation without storing a list.
"""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl


def _rank(name: str, salt: str) -> str:
    return hashlib.sha256(f"{salt}:{name}".encode()).hexdigest()


def _majority_labels(df: pl.DataFrame) -> pl.DataFrame:
    """One row per group: ``group`` and its most frequent ``label``; a tie goes to the last
    label by name. (An unstable sort once settled ties at random, so one frame,
    ``quake_intact_132``, sat in image train in some runs and in test in others; this rule
    keeps it in train, the split the shipped head was trained and scored on.)"""
    return (
        df.group_by("group", "label")
        .len()
        .sort(["len", "label"], descending=[True, True], maintain_order=True)
        .unique("group", keep="first", maintain_order=True)
    )


def grouped_split(
    df: pl.DataFrame, val_fraction: float = 0.2, salt: str = "cityfuse-v1"
) -> pl.Series:
    """Boolean Series, True for validation rows.

    For each label, groups holding that label (by their majority label) are ordered by a
    salted hash and taken into validation until ``val_fraction`` of that label's rows is
    reached, with at least one group per label when the label has two or more groups.
    """
    major = _majority_labels(df)
    sizes = dict(zip(*df.group_by("group").len().to_dict(as_series=False).values(), strict=True))
    val_groups: set[str] = set()
    for label in sorted(major["label"].unique()):
        groups = sorted(
            major.filter(pl.col("label") == label)["group"], key=lambda g: _rank(g, salt)
        )
        if len(groups) < 2:
            continue
        total = sum(sizes[g] for g in groups)
        taken = 0
        for g in groups:
            if taken >= val_fraction * total and taken > 0:
                break
            val_groups.add(g)
            taken += sizes[g]
    return df["group"].is_in(sorted(val_groups))


def grouped_folds(df: pl.DataFrame, k: int, salt: str = "cityfuse-cv") -> pl.Series:
    """Fold id (0..k-1) per row, whole groups per fold.

    Groups are dealt round-robin per majority label in salted-hash order, so every fold
    holds about 1/k of each label's groups (the CCTV videos spread over all folds).
    """
    major = _majority_labels(df)
    fold_of: dict[str, int] = {}
    for label in sorted(major["label"].unique()):
        groups = sorted(
            major.filter(pl.col("label") == label)["group"], key=lambda g: _rank(g, salt)
        )
        for i, g in enumerate(groups):
            fold_of[g] = i % k
    return df["group"].replace_strict(fold_of, return_dtype=pl.Int64).alias("fold")


def audio_split(df: pl.DataFrame, salt: str = "cityfuse-v1") -> tuple[pl.Series, pl.Series]:
    """(train mask, validation mask) for the hotline clips.

    Validation = held-out voices AND held-out sentences; training drops both, so neither
    a validation voice nor a validation sentence is ever heard in training (README warning).
    """
    voices = sorted(df["group"].unique(), key=lambda g: _rank(g, salt))
    val_voices = voices[: max(1, len(voices) // 4)]
    sentences = sorted(df["sentence_id"].unique(), key=lambda s: _rank(s, salt))
    val_sentences = sentences[: max(1, len(sentences) // 4)]
    in_voice = df["group"].is_in(val_voices)
    in_sentence = df["sentence_id"].is_in(val_sentences)
    return (~in_voice & ~in_sentence), (in_voice & in_sentence)


# --- Three-way splits: train / val / test -------------------------------------------------
# The validation groups above (salt "cityfuse-v1") have been used for choices: they stay
# validation. Test groups come only from the groups no choice has looked at, so a test
# score is never tuned. Every script, test and recording builder asks `three_way` (one place).

SPENT_SALT = "cityfuse-v1"


def _split_config() -> dict[str, object]:
    import json

    from streams.taxonomy import CONFIG_DIR

    return dict(json.loads((CONFIG_DIR / "splits.json").read_text(encoding="utf-8")))


def three_way(df: pl.DataFrame, modality: str) -> pl.Series:
    """``"train" | "val" | "test"`` per row, whole groups only.

    ``modality`` is ``text`` (test events named in ``configs/splits.json``), ``image``
    (test groups by a salted hash among the unspent ones) or ``audio`` (test = two unspent
    voices AND a quarter of the unspent sentences; training drops every test or validation
    voice and sentence, so no voice or sentence is shared across splits).
    """
    cfg = _split_config()
    salt, frac = str(cfg["test_salt"]), float(cfg["test_fraction"])  # type: ignore[arg-type]
    if modality == "audio":
        return _audio_three_way(df, salt)
    val = grouped_split(df, salt=SPENT_SALT)
    if modality == "text":
        test = df["group"].is_in(list(cfg["text_test_groups"]))  # type: ignore[call-overload]
    elif modality == "image":
        rest = df.filter(~val)
        test_groups = rest.filter(grouped_split(rest, val_fraction=frac, salt=salt))["group"]
        test = df["group"].is_in(test_groups.unique().to_list())
    else:
        raise ValueError(f"unknown modality {modality!r}")
    out = pl.select(
        pl.when(pl.lit(test))
        .then(pl.lit("test"))
        .when(pl.lit(val))
        .then(pl.lit("val"))
        .otherwise(pl.lit("train"))
    ).to_series()
    return out.alias("split")


def _audio_three_way(df: pl.DataFrame, salt: str) -> pl.Series:
    _, spent_val = audio_split(df, salt=SPENT_SALT)
    voices = sorted(df["group"].unique(), key=lambda g: _rank(g, SPENT_SALT))
    val_voices = voices[: max(1, len(voices) // 4)]
    sentences = sorted(df["sentence_id"].unique(), key=lambda s: _rank(s, SPENT_SALT))
    val_sentences = sentences[: max(1, len(sentences) // 4)]
    free_voices = sorted(set(voices) - set(val_voices), key=lambda g: _rank(g, salt))
    free_sentences = sorted(set(sentences) - set(val_sentences), key=lambda s: _rank(s, salt))
    test_voices = free_voices[: max(1, len(voices) // 4)]
    test_sentences = free_sentences[: max(1, len(sentences) // 4)]
    voice, sent = df["group"], df["sentence_id"]
    test = voice.is_in(test_voices) & sent.is_in(test_sentences)
    held_voice = voice.is_in(val_voices + test_voices)
    held_sent = sent.is_in(val_sentences + test_sentences)
    train = ~held_voice & ~held_sent
    return (
        pl.select(
            pl.when(pl.lit(test))
            .then(pl.lit("test"))
            .when(pl.lit(spent_val))
            .then(pl.lit("val"))
            .when(pl.lit(train))
            .then(pl.lit("train"))
            .otherwise(pl.lit("unused"))
        )
        .to_series()
        .alias("split")
    )


# --- Cross-fitting: folds of the groups a head trains on ------------------------------------
# The fusion head is a second-level model over the encoders' vectors. An encoder has seen the
# rows it was fitted on, so their vectors are surer than a new input's; a head trained on them
# learns to trust the encoder too much. Cross-fitting gives each head-training row the vector of
# an encoder fitted without that row's group: the pool's groups are dealt into ``k`` folds and
# fold ``i``'s rows are embedded by the encoder fitted on the other folds (its ``fit_on`` is
# ``"<pool>-cf<i>of<k>"``, e.g. ``"train+val-cf0of2"``).

CROSSFIT_POOLS = ("train", "train+val")


def parse_fit_on(fit_on: str) -> tuple[str, int | None, int | None]:
    """``(pool, held-out fold, folds)`` of a ``fit_on``: ``"train"``, ``"train+val"`` or a
    cross-fit ``"<pool>-cf<i>of<k>"`` (fit on the pool without fold ``i`` of ``k``)."""
    import re

    m = re.fullmatch(r"(train|train\+val)(?:-cf(\d+)of(\d+))?", fit_on)
    if m is None:
        raise ValueError(
            f"fit_on must be train, train+val or <pool>-cf<i>of<k> (e.g. train+val-cf0of2), "
            f"not {fit_on!r}"
        )
    if m[2] is None:
        return m[1], None, None
    held, k = int(m[2]), int(m[3])
    if not 0 <= held < k or k < 2:
        raise ValueError(f"{fit_on!r}: fold {held} of {k} does not exist")
    return m[1], held, k


def is_fold(fit_on: str) -> bool:
    """Whether ``fit_on`` names a cross-fit fold (never served, kept out of method tables)."""
    return parse_fit_on(fit_on)[1] is not None


def crossfit_fit_on(pool: str, held: int, k: int) -> str:
    """The ``fit_on`` of the encoder that embeds fold ``held`` of ``pool`` (see module notes)."""
    return f"{pool}-cf{held}of{k}"


def fit_suffix(fit_on: str) -> str:
    """Artifact-name suffix of a fit: "" (train), ``-tv`` (train + val refit, ``REFIT_SUFFIX``),
    ``-tv-cf0of2`` / ``-tr-cf0of2`` (cross-fit folds; never served, kept in the cache)."""
    from models.weights import REFIT_SUFFIX

    pool, held, k = parse_fit_on(fit_on)
    base = REFIT_SUFFIX if pool == "train+val" else ""
    if held is None:
        return base
    return f"{base or '-tr'}-cf{held}of{k}"


def in_pool(df: pl.DataFrame, modality: str, pool: str) -> pl.Series:
    """Rows of ``pool`` (``"train"`` or ``"train+val"``). For calls, ``train+val`` is every
    clip whose voice and sentence are both outside test (what a calls refit trains on)."""
    split = three_way(df, modality)
    if pool == "train":
        return split == "train"
    if modality == "audio":
        test = df.filter(split == "test")
        return ~df["group"].is_in(test["group"].unique().to_list()) & ~df["sentence_id"].is_in(
            test["sentence_id"].unique().to_list()
        )
    return split.is_in(["train", "val"])


def crossfit_fold(df: pl.DataFrame, modality: str, pool: str, k: int) -> pl.Series:
    """Fold id (0..k-1) of each row of ``pool``, -1 outside it. Text and frames: whole groups
    dealt per majority label (:func:`grouped_folds`); calls: voices dealt in salted-hash
    order (every voice reads most sentences, so a fold's sentences are also heard in the
    other folds; only its voices are new to the encoder that embeds it)."""
    mask = in_pool(df, modality, pool)
    rows = df.filter(mask)
    if modality == "audio":
        voices = sorted(rows["group"].unique(), key=lambda g: _rank(g, "cityfuse-cf"))
        folds = rows["group"].replace_strict(
            {v: i % k for i, v in enumerate(voices)}, return_dtype=pl.Int64
        )
    else:
        folds = balanced_folds(rows, k)
    out = np.full(df.height, -1, dtype=np.int64)
    out[mask.to_numpy()] = folds.to_numpy()
    return pl.Series("fold", out)


def balanced_folds(df: pl.DataFrame, k: int, salt: str = "cityfuse-cf") -> pl.Series:
    """Fold id per row, whole groups per fold, folds of about equal size per label: each
    label's groups (by majority label), largest first, go to the fold holding the fewest
    rows of that label so far (crisis events differ in size 20-fold, so dealing them
    round-robin would leave one fold a sixth of the rows)."""
    major = _majority_labels(df)
    sizes = dict(zip(*df.group_by("group").len().to_dict(as_series=False).values(), strict=True))
    fold_of: dict[str, int] = {}
    total = [0] * k
    for label in sorted(major["label"].unique()):
        held = [0] * k
        groups = major.filter(pl.col("label") == label)["group"].to_list()
        for g in sorted(groups, key=lambda g: (-sizes[g], _rank(g, salt))):
            f = min(range(k), key=lambda i: (held[i], total[i], i))
            fold_of[g] = f
            held[f] += sizes[g]
            total[f] += sizes[g]
    return df["group"].replace_strict(fold_of, return_dtype=pl.Int64).alias("fold")


def fit_rows(df: pl.DataFrame, modality: str, fit_on: str) -> pl.Series:
    """Rows an encoder with this ``fit_on`` trains on (the pool, less the held-out fold)."""
    pool, held, k = parse_fit_on(fit_on)
    if held is None or k is None:
        return in_pool(df, modality, pool)
    fold = crossfit_fold(df, modality, pool, k)
    return (fold >= 0) & (fold != held)
