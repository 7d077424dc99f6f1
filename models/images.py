"""Bounded image decoding: size, pixel count and shape are checked from the header before any
pixel is decoded, and large images are decoded small (JPEG draft mode, PNG reduce)."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

from PIL import Image

from streams.errors import RejectedInput
from streams.settings import defaults

ALLOWED_FORMATS = ("JPEG", "PNG")


@dataclass(frozen=True)
class ImageLimits:
    """Upper bounds for one frame, and the size it is decoded towards."""

    max_bytes: int = field(default_factory=lambda: defaults().limits.image_bytes)
    max_pixels: int = field(default_factory=lambda: defaults().limits.image_pixels)
    max_aspect: float = field(default_factory=lambda: defaults().limits.image_aspect_max)
    # JPEGs are DCT-scaled while decoding so that both sides stay >= this (0: full size);
    # the vision encoder resizes the shorter side to its input size anyway (the vision
    # service raises this to that size when it is larger).
    draft_px: int = field(default_factory=lambda: defaults().limits.image_draft_px)


def check_header(w: int, h: int, limits: ImageLimits) -> None:
    """Refuse a frame by its header dimensions: empty, too many pixels, or too elongated
    (a 4,000,000 x 10 image would otherwise be resized to 89.6M x 224)."""
    if w <= 0 or h <= 0:
        raise RejectedInput("decode", "image_decode_error", f"{w}x{h}: empty image")
    if w * h > limits.max_pixels:
        raise RejectedInput("decode", "image_too_large", f"{w}x{h} pixels > {limits.max_pixels}")
    if max(w / h, h / w) > limits.max_aspect:
        raise RejectedInput(
            "decode", "image_bad_shape", f"{w}x{h}: aspect ratio over {limits.max_aspect:g}"
        )


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode a JPEG or PNG into RGB, or raise :class:`RejectedInput` with a stable reason.

    The result keeps both sides >= ``limits.draft_px`` when the source is larger (JPEG draft
    decoding, PNG integer reduce), so the encoder's resize works on a small image."""
    if len(data) > limits.max_bytes:
        raise RejectedInput("decode", "image_too_large", f"{len(data)} bytes > {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            # Image.open reads only the header: size and shape are known before decoding.
            check_header(*img.size, limits)
            if limits.draft_px and img.format == "JPEG":
                img.draft("RGB", (limits.draft_px, limits.draft_px))
            img.load()
            out: Image.Image = img
            factor = min(img.size) // limits.draft_px if limits.draft_px else 1
            if factor >= 2:
                out = img.reduce(factor)
            return out.convert("RGB")
    except RejectedInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own header check fired first (far beyond our limit).
        raise RejectedInput("decode", "image_too_large", str(e)[:300]) from e
    except Exception as e:
        # Hostile bytes reach deep into the codecs (OSError, SyntaxError, struct.error,
        # IndexError, MemoryError ...): each is a rejection of this frame, never a crash.
        raise RejectedInput("decode", "image_decode_error", f"{type(e).__name__}: {e}"[:300]) from e
