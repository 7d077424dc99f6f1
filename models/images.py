"""Bounded image decoding: size and pixel limits are checked from the header before any decode."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from streams.errors import RejectedInput
from streams.settings import defaults

ALLOWED_FORMATS = ("JPEG", "PNG")


@dataclass(frozen=True)
class ImageLimits:
    """Upper bounds for one frame."""

    max_bytes: int = field(default_factory=lambda: defaults().limits.image_bytes)
    max_pixels: int = field(default_factory=lambda: defaults().limits.image_pixels)


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode a JPEG or PNG into RGB, or raise :class:`RejectedInput` with a stable reason."""
    if len(data) > limits.max_bytes:
        raise RejectedInput("decode", "image_too_large", f"{len(data)} bytes > {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            # Image.open reads only the header: the pixel count is known before decoding.
            w, h = img.size
            if w * h > limits.max_pixels:
                raise RejectedInput(
                    "decode", "image_too_large", f"{w}x{h} pixels > {limits.max_pixels}"
                )
            img.load()
            return img.convert("RGB")
    except RejectedInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own header check fired first (far beyond our limit).
        raise RejectedInput("decode", "image_too_large", str(e)[:300]) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise RejectedInput("decode", "image_decode_error", f"{type(e).__name__}: {e}"[:300]) from e
