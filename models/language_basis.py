"""Directions of a text vector space that carry the language, and their removal.

The fine-tuned e5 vectors keep a language component. A head trained on mostly English
reports, where a language is often one event and one or two labels, can learn it as
evidence (docs/crossfit.md, ninth study). The basis here spans the top ``k`` directions of
the language means (languages with enough rows), estimated without labels; :func:`remove`
projects them out and renormalises.
"""

from __future__ import annotations

import numpy as np

MIN_ROWS = 20  # a language with fewer rows has too noisy a mean to define a direction


def language_basis(x: np.ndarray, langs: np.ndarray, k: int) -> np.ndarray:
    """(k, dim) orthonormal rows: the top ``k`` right singular vectors of the stacked
    language means minus the overall mean (``k = 0``: an empty basis)."""
    if k == 0:
        return np.zeros((0, x.shape[1]), dtype=x.dtype)
    mu = x.mean(0)
    means = [x[langs == g].mean(0) - mu for g in np.unique(langs) if (langs == g).sum() >= MIN_ROWS]
    if len(means) < k:
        raise ValueError(f"{len(means)} languages with >= {MIN_ROWS} rows: too few for k = {k}")
    _, _, vt = np.linalg.svd(np.stack(means), full_matrices=False)
    return np.asarray(vt[:k], dtype=x.dtype)


def remove(x: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """``x`` without its components along ``basis``, each row back to unit length."""
    if len(basis) == 0:
        return x
    out = x - (x @ basis.T) @ basis
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(x.dtype)
