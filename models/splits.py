"""Grouped train/validation splits: whole groups (events, videos, voices) are held out.

The choice is a pure function of the group names (a hash), so every script, test and
the demo recording agree on which samples are validation without storing a list.
"""

from __future__ import annotations

import hashlib

import polars as pl


def _rank(name: str, salt: str) -> str:
    return hashlib.sha256(f"{salt}:{name}".encode()).hexdigest()


def grouped_split(
    df: pl.DataFrame, val_fraction: float = 0.2, salt: str = "cityfuse-v1"
) -> pl.Series:
    """Boolean Series, True for validation rows.

    For each label, groups holding that label (by their majority label) are ordered by a
    salted hash and taken into validation until ``val_fraction`` of that label's rows is
    reached, with at least one group per label when the label has two or more groups.
    """
    major = (
        df.group_by("group", "label")
        .len()
        .sort("len", descending=True)
        .unique("group", keep="first")
    )
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
