"""The one exception type for input the pipeline refuses; services turn it into a ``city.dlq`` record."""

from __future__ import annotations

from typing import Literal

Stage = Literal["decode", "validate", "infer", "fuse"]


class RejectedInput(Exception):
    """Input that cannot be processed.

    ``reason`` is a short stable code (``image_decode_error``, ``audio_too_long`` ...) that
    dashboards and alerts group by; ``detail`` is free text for a human.
    """

    def __init__(self, stage: Stage, reason: str, detail: str = "") -> None:
        super().__init__(f"{stage}/{reason}: {detail}")
        self.stage: Stage = stage
        self.reason = reason
        self.detail = detail
