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

from models.e5_convert import PASSAGE
from models.finetune_text import ARTIFACTS, load_classifier


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
        self.precision = "fp32"  # set by services.speedups.serve_text for the served path

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """(n, 384) float32 unit vectors of already-cleaned texts.

        The whole batch is tokenised once (no padding), sorted by token count and run in
        chunks of ``batch_size`` padded only to their own longest text. ``precision``
        (``services.speedups.serve_text``) is fp32 as loaded, or bf16 / int8 when served.
        """
        from services.speedups import autocast

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self.tokenizer(
            [PASSAGE + t for t in texts], truncation=True, max_length=self.max_length
        )["input_ids"]
        order = np.argsort([len(x) for x in ids], kind="stable")
        pad = int(self.tokenizer.pad_token_id)
        with self._lock, autocast(self.precision):
            for i in range(0, len(texts), batch_size):
                idx = order[i : i + batch_size]
                width = max(len(ids[j]) for j in idx)
                input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, j in enumerate(idx):
                    input_ids[row, : len(ids[j])] = torch.tensor(ids[j])
                    mask[row, : len(ids[j])] = 1
                vecs = self.model.embed(input_ids=input_ids, attention_mask=mask)
                out[idx] = vecs.float().numpy()
        return out

    @torch.inference_mode()
    def logits(self, texts: list[str]) -> np.ndarray:
        """The artifact's own 7-label head over :meth:`encode` (used to score the method)."""
        vecs = torch.from_numpy(self.encode(texts))
        return self.model.head(vecs).numpy()
