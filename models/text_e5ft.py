"""The served fine-tuned multilingual-e5-small: fp32 base from the cached conversion + a small artifact.

The artifact (``models/artifacts/text_<method>.safetensors``) holds only what a method trained
(LoRA/IA3 adapters, biases or prompt vectors, and the 7-label head); adapters are merged into
the base weights at load time, so inference costs what plain e5 costs.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import torch

from models.finetune_text import ARTIFACTS, load_classifier, tokenize


def artifact_version(path: Path) -> str:
    """``e5ft-<method>-<sha12 of the artifact>``: names the exact weights in alerts."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        method = f.metadata()["method"]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return f"e5ft-{method}-{digest}"


class FineTunedE5:
    """Fine-tuned e5 text vectors: ``passage:`` prefix, mean pooling, L2 (384-d)."""

    dim = 384

    def __init__(self, artifact: str) -> None:
        path = ARTIFACTS / artifact
        model, self.tokenizer, cfg = load_classifier(path)
        encoder = model.encoder
        if cfg.method in ("lora", "ia3"):
            encoder = encoder.merge_and_unload()  # type: ignore[operator]
            model.encoder = encoder
        self.model = model.eval()
        self.method = cfg.method
        self.version = artifact_version(path)
        # The length the method was trained and chosen on (validation scored the same way).
        self.max_length = cfg.max_length
        self._lock = threading.Lock()  # torch modules are not re-entrant across threads

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """(n, 384) float32 unit vectors of already-cleaned texts.

        Tokenised once; texts are sorted by length so each batch pads to a similar length.
        """
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        order = np.argsort([len(t) for t in texts], kind="stable")
        with self._lock:
            for i in range(0, len(texts), batch_size):
                idx = order[i : i + batch_size]
                batch = tokenize(self.tokenizer, [texts[j] for j in idx], self.max_length)
                out[idx] = self.model.embed(**batch).numpy()
        return out

    @torch.inference_mode()
    def logits(self, texts: list[str]) -> np.ndarray:
        """The artifact's own 7-label head over :meth:`encode` (used to score the method)."""
        vecs = torch.from_numpy(self.encode(texts))
        return self.model.head(vecs).numpy()
