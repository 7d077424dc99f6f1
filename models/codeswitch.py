"""Code-switching augmentation for the text encoder's training reports (CoSDA-ML style).

An English training report has some of its words replaced by their Spanish, Italian or
Portuguese translations (one language per report), from a small hand-written lexicon
(``models/lexicons/codeswitch.tsv``). Two uses while the encoder is fine-tuned on mostly
English data (docs/crossfit.md): the switched row replaces its original
(``FTConfig.codeswitch``; eleventh and twelfth studies, English lost, not served), or it is
a consistency target pulled towards its clean original's vector
(``FTConfig.codeswitch_pair``, ``models.finetune_text.pair_loss``; fourteenth study,
served). Either way the city's incident words are tied to the English ones. Training only:
inference reads the report as it came.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numpy as np

LEXICON = Path(__file__).resolve().parent / "lexicons" / "codeswitch.tsv"
TARGETS = ("es", "it", "pt")
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


@lru_cache(maxsize=1)
def lexicon() -> dict[str, dict[str, tuple[str, ...]]]:
    """``{english word: {language: translations}}`` from the lexicon file."""
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for line in LEXICON.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        word, *translations = line.split("\t")
        if len(translations) != len(TARGETS):
            raise ValueError(f"{LEXICON.name}: {word!r} needs {len(TARGETS)} translations")
        out[word.lower()] = {
            lang: tuple(t.split("|")) for lang, t in zip(TARGETS, translations, strict=True)
        }
    return out


def switch(text: str, lang: str, rng: np.random.Generator, word_p: float = 0.8) -> str:
    """``text`` with each lexicon word replaced, with probability ``word_p``, by one of its
    ``lang`` translations (a capital first letter is kept)."""
    table = lexicon()

    def swap(m: re.Match[str]) -> str:
        word = m.group(0)
        options = table.get(word.lower(), {}).get(lang)
        if not options or rng.random() >= word_p:
            return word
        new = options[int(rng.integers(len(options)))]
        return new[:1].upper() + new[1:] if word[:1].isupper() else new

    return _WORD.sub(swap, text)


class CodeSwitcher:
    """Code-switches English training rows with probability ``row_p`` (a seeded stream,
    apart from the batch sampler's, so that the batches stay those of the plain recipe)."""

    def __init__(self, row_p: float, seed: int, word_p: float = 0.8) -> None:
        self.row_p, self.word_p = row_p, word_p
        self.rng = np.random.default_rng(seed + 7919)

    def __call__(self, text: str, lang: str) -> str:
        """The row as trained on: switched only if English and drawn."""
        if lang != "en" or self.rng.random() >= self.row_p:
            return text
        target = TARGETS[int(self.rng.integers(len(TARGETS)))]
        return switch(text, target, self.rng, self.word_p)
