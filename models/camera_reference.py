"""Per-camera normal-scene reference: a frame is judged against its own camera's usual view.

A fixed camera's accident and normal frames look alike to an ImageNet model (same road,
same light); what differs is the change from that camera's ordinary scene. For each
``camera_id`` we keep a small ring buffer of embeddings of its recent *ordinary* frames
(bounded, least-recently-seen cameras evicted) and give the encoder's output as the
camera-relative view ``[embedding, embedding - mean(ring)]``.

"Ordinary" must be decided without labels at serving time. Rules (``configs/services.json``
key ``camera_reference``, chosen on validation groups only):

- ``confident``: frames the fine-tuned encoder's own classifier calls ``no_incident`` with
  probability >= ``min_p_ordinary``;
- ``first``: the first ``window`` frames a camera sends (a warm-up view, then frozen);
- ``recent``: every recent frame (a running view of the scene, incidents included).

A frame is compared with the reference as it stood *before* that frame; a camera with no
reference yet, or a frame without a camera id (still photos), gets a zero difference.
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from streams.taxonomy import CONFIG_DIR

RULES = ("confident", "first", "recent")


@dataclass(frozen=True)
class ReferenceBounds:
    """How many cameras are remembered, how many frames each, and what counts as ordinary."""

    max_cameras: int = 1024
    window: int = 16
    min_p_ordinary: float = 0.8
    rule: str = "confident"

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"camera_reference.rule must be one of {RULES}, not {self.rule!r}")
        if self.max_cameras < 1 or self.window < 1:
            raise ValueError("camera_reference bounds must be >= 1")

    @classmethod
    def from_config(cls) -> ReferenceBounds:
        """The bounds in ``configs/services.json`` (key ``camera_reference``)."""
        raw = json.loads((CONFIG_DIR / "services.json").read_text(encoding="utf-8"))
        return cls(**raw["camera_reference"])


class CameraReferences:
    """Bounded per-camera ring buffers of ordinary-frame embeddings (LRU over cameras)."""

    def __init__(self, bounds: ReferenceBounds) -> None:
        self.bounds = bounds
        self._rings: OrderedDict[str, deque[np.ndarray]] = OrderedDict()
        self._seen: dict[str, int] = {}  # frames seen per remembered camera (rule "first")

    def __len__(self) -> int:
        return len(self._rings)

    def reference(self, camera_id: str) -> np.ndarray | None:
        """Mean embedding of the camera's remembered ordinary frames, or None."""
        ring = self._rings.get(camera_id)
        if not ring:
            return None
        return np.mean(np.stack(ring), axis=0)

    def observe(self, camera_id: str, embedding: np.ndarray, p_ordinary: float) -> None:
        """Remember a frame of ``camera_id`` if the rule calls it ordinary."""
        b = self.bounds
        ring = self._rings.get(camera_id)
        if ring is None:
            ring = self._rings[camera_id] = deque(maxlen=b.window)
            self._seen[camera_id] = 0
            while len(self._rings) > b.max_cameras:  # evict the least recently seen camera
                old, _ = self._rings.popitem(last=False)
                self._seen.pop(old, None)
        self._rings.move_to_end(camera_id)
        self._seen[camera_id] += 1
        if b.rule == "first":
            ordinary = self._seen[camera_id] <= b.window
        elif b.rule == "confident":
            ordinary = p_ordinary >= b.min_p_ordinary
        else:
            ordinary = True
        if ordinary:
            ring.append(np.asarray(embedding, dtype=np.float32))

    def relative(
        self, camera_id: str | None, embedding: np.ndarray, p_ordinary: float
    ) -> np.ndarray:
        """``[embedding, embedding - reference]`` from the reference before this frame; then observe it."""
        if not camera_id:
            return relative_view(embedding, None)
        out = relative_view(embedding, self.reference(camera_id))
        self.observe(camera_id, embedding, p_ordinary)
        return out


def relative_view(embedding: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    """The camera-relative feature; a missing reference gives a zero difference."""
    diff = np.zeros_like(embedding) if reference is None else embedding - reference
    return np.concatenate([embedding, diff]).astype(np.float32)


def sequential_view(
    camera_ids: Sequence[str | None],
    order: Sequence[float],
    embeddings: np.ndarray,
    p_ordinary: np.ndarray,
    bounds: ReferenceBounds,
) -> np.ndarray:
    """Relative views of a whole table, each camera replayed in ``order`` (frame index).

    The honest simulation of serving for training and validation: frame i's reference is
    built only from the same camera's frames before it.
    """
    refs = CameraReferences(bounds)
    out = np.zeros((len(embeddings), 2 * embeddings.shape[1]), dtype=np.float32)
    # Cameras are replayed one after another, so the LRU bound never evicts mid-video.
    rows = sorted(range(len(embeddings)), key=lambda i: (camera_ids[i] or "", order[i]))
    for i in rows:
        out[i] = refs.relative(camera_ids[i], embeddings[i], float(p_ordinary[i]))
    return out


def frame_order(values: Sequence[str | float | None]) -> list[float]:
    """``frame_index`` column values as sort keys (empty for still photos: 0)."""
    return [float(v) if v not in (None, "") else 0.0 for v in values]
