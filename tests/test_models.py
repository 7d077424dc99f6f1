"""Encoders, bounded decoders and the fusion head, on real weights and real data."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.fusion import Evidence, FusionModel
from models.images import ImageLimits, decode_image
from models.text import FROZEN_VIEWS, TextEncoder
from services.runtime import Models
from streams.errors import RejectedInput
from streams.taxonomy import label_names


@pytest.fixture(scope="module")
def frozen_views() -> TextEncoder:
    """The former text view, still selectable in configs/models.json (minilm+e5q4-frozen)."""
    return TextEncoder(FROZEN_VIEWS)


def test_text_view_is_minilm_beside_multilingual_e5(frozen_views: TextEncoder) -> None:
    a, b, c = frozen_views.encode(
        ["a car crashed into a truck", "two vehicles collided on the road", "I love this pizza"]
    )
    assert a.shape == (768,) and abs(np.linalg.norm(a) - 1) < 1e-5
    assert a @ b > a @ c  # paraphrases are closer than unrelated text
    # MiniLM half: matches sentence-transformers' mean pooling + L2 on the cleaned text.
    from sentence_transformers import SentenceTransformer

    from models.weights import minilm_dir

    st = SentenceTransformer(str(minilm_dir()), device="cpu").encode(
        ["a car crashed into a truck"]
    )[0]
    np.testing.assert_allclose(a[:384] * np.sqrt(2), st, atol=1e-5)
    # e5 half: a Spanish report is closer to its English meaning than to an unrelated one.
    es, en, other = frozen_views.encode(
        [
            "incendio en un edificio, mucho humo",
            "fire in a building, lots of smoke",
            "I love this pizza",
        ]
    )
    e5 = slice(384, 768)
    assert es[e5] @ en[e5] > es[e5] @ other[e5]


def test_vision_weights_give_sensible_imagenet_classes(models: Models, data_dir: Path) -> None:
    from models.vision import VisionEncoder

    img = decode_image((data_dir / "images/fire/cairfire_000.jpg").read_bytes())
    feats, _ = models.vision.forward([img])
    assert feats.shape == (1, 1280)
    # The base weights' own ImageNet classifier reads the base features only (the served
    # artifact retrains the last stages). ImageNet 980 = volcano: a strict, correct rename
    # gives fire-like classes for a fire photo.
    _, logits = VisionEncoder(artifact="").forward([img])
    top5 = set(np.argsort(logits[0])[-5:].tolist())
    assert 980 in top5


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size (the body is irrelevant: it must never be decoded)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_image_limits_are_checked_before_decoding() -> None:
    with pytest.raises(RejectedInput) as e:
        decode_image(_png_header(100_000, 100_000))
    assert e.value.reason == "image_too_large"
    with pytest.raises(RejectedInput) as e:
        decode_image(b"\xff\xd8\xff" + b"\x00" * 100)
    assert e.value.reason == "image_decode_error"
    with pytest.raises(RejectedInput) as e:
        decode_image(b"x" * 20, ImageLimits(max_bytes=10))
    assert e.value.reason == "image_too_large"
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, format="GIF")
    with pytest.raises(RejectedInput):  # only JPEG and PNG are opened
        decode_image(gif.getvalue())


def test_fusion_head_labels_every_subset(models: Models) -> None:
    fusion: FusionModel = models.fusion
    assert fusion.labels == label_names()
    rng = np.random.default_rng(0)
    ev = {
        "text": Evidence(
            "text", models.text.encode(["Fire! the building is burning, flames everywhere"])[0]
        ),
        "image": Evidence(
            "image", (v := rng.standard_normal(1280).astype(np.float32)) / np.linalg.norm(v)
        ),
        "audio": Evidence(
            "audio",
            (w := rng.standard_normal(384).astype(np.float32)) / np.linalg.norm(w),
            models.text.encode(["there is a fire in my kitchen"])[0],
        ),
    }
    import itertools

    for r in (1, 2, 3):
        for subset in itertools.combinations(ev, r):
            p = fusion.predict([ev[m] for m in subset])
            assert p.label in label_names()
            assert abs(sum(p.probs.values()) - 1) < 1e-4
            assert sorted(p.contributions) == sorted(subset)
            assert 0 <= p.confidence <= 1
    assert fusion.predict([ev["text"]]).label == "fire"
    with pytest.raises(ValueError):
        fusion.predict([])


CLIP = "audio/flood/flood_20_mbrola-us2.ogg"
# Its spoken text (shared/data/audio/audio.csv).
SPOKEN = (
    "The river flooded the campground on Forest Road. "
    "Some tents were washed away and people are missing."
)


def test_converted_whisper_transcribes_a_bundled_clip(data_dir: Path) -> None:
    """The converted base weights (frozen, full 30-s window) read a clip word for word."""
    from models.audio import decode_audio
    from models.speech import SpeechConfig, SpeechEncoder

    frozen = SpeechEncoder(config=SpeechConfig())
    _, [text] = frozen.encode([decode_audio((data_dir / CLIP).read_bytes(), "audio/ogg")])
    words = set(text.lower().replace(",", " ").replace(".", " ").split())
    assert {"river", "flooded", "campground", "forest"} <= words, text


def test_served_whisper_keeps_the_transcript_close(models: Models, data_dir: Path) -> None:
    """The served variant (fine-tuned, trimmed context, int8 decoder) stays near the words."""
    from benchmarks.wer import wer
    from models.audio import decode_audio

    _, [text] = models.speech.encode([decode_audio((data_dir / CLIP).read_bytes(), "audio/ogg")])
    assert wer([(SPOKEN, text)]) <= 0.35, text


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_openvino_vision_backend_matches_torch(data_dir: Path, precision: str) -> None:
    """The OpenVINO-compiled pooled feature gives the torch path's vectors and labels."""
    from models.vision import VisionEncoder
    from services.speedups import serve_vision

    paths = ["fire/cairfire_000.jpg", "flood/floodmarco_Flood_1011.jpg"]
    frames = [decode_image((data_dir / "images" / p).read_bytes()) for p in paths] * 3
    torch_enc, ov_enc = VisionEncoder(), VisionEncoder()
    serve_vision(ov_enc, precision, chunk=4, backend="openvino")
    assert ov_enc.serving == f"image-{precision}-openvino-chunk4"
    ref_feats, ref_probs = torch_enc.scores(frames)
    feats, probs = ov_enc.scores(frames)
    cosine = (ref_feats * feats).sum(axis=1)
    assert cosine.min() > (0.9999 if precision == "fp32" else 0.99), cosine
    assert (ref_probs.argmax(1) == probs.argmax(1)).all()
    # The FLOP counter's eager view runs torch, then the compiled model is back.
    with ov_enc.eager():
        assert ov_enc.compiled is None
    assert ov_enc.compiled is not None
