"""Word error rate from a word-level edit distance (no jiwer: a few lines suffice)."""

from __future__ import annotations

import re
from collections.abc import Iterable

_FILLERS = frozenset({"uh", "um", "er", "ah", "hmm", "mm"})
_WORD = re.compile(r"[a-z0-9']+")


def normalise(text: str) -> list[str]:
    """Lower-case words without punctuation or fillers (the data's transcripts keep "uh"/"um",
    which Whisper usually drops: counting them would score the data, not the model)."""
    return [w for w in _WORD.findall(text.lower().replace("’", "'")) if w not in _FILLERS]


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance between two word lists (substitution, insertion, deletion = 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def wer(pairs: Iterable[tuple[str, str]]) -> float:
    """Corpus WER of (reference, hypothesis) pairs: total edits / total reference words."""
    edits = words = 0
    for ref, hyp in pairs:
        r = normalise(ref)
        edits += edit_distance(r, normalise(hyp))
        words += len(r)
    return edits / words if words else 0.0
