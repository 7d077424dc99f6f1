"""A hostile corpus through the real broker and the real text, vision and speech services.

Each hostile record is followed by a good record of the same kind. Every hostile record must
land in ``city.dlq`` with the expected stage and reason, every good one must become an
embedding, the services must still run afterwards and the process RSS must stay bounded.
Only repo-shipped media are used (``recordings/demo/media``), plus bytes made here."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as fuzz_settings
from hypothesis import strategies as st
from PIL import Image

from models.audio import decode_audio
from models.images import decode_image
from services.base import BatchService
from services.encoders import SpeechService, TextService, VisionService
from streams import topics
from streams.clients import KafkaSettings, ensure_topics, make_producer
from streams.errors import RejectedInput
from streams.schemas import (
    CameraFrame,
    HotlineCall,
    InputEvent,
    Location,
    TextReport,
    utc_now,
)
from streams.serde import from_bytes, json_depth, to_bytes
from streams.settings import defaults
from tests.kafka_helpers import event, reader
from tests.test_models import _png_header

# The corpus waits generously on a loaded machine (see the fixture); the default 600 s is short.
pytestmark = pytest.mark.timeout(2400)

DEMO_MEDIA = Path(__file__).resolve().parent.parent / "recordings" / "demo" / "media"


def _first_good(pattern: str, check: Callable[[bytes], object]) -> Path:
    """The first bundled demo file of ``pattern`` that the services' own decoder accepts
    (the demo also ships deliberately bad media)."""
    for path in sorted(DEMO_MEDIA.glob(pattern)):
        with contextlib.suppress(RejectedInput):
            check(path.read_bytes())
            return path
    raise AssertionError(f"no decodable {pattern} in {DEMO_MEDIA}")


GOOD_JPG = _first_good("*.jpg", decode_image)
GOOD_OGG = _first_good("*.ogg", decode_audio)
# Generous: the point is "bounded", not a tight figure (measured figures go to the notes).
RSS_GROWTH_MAX = 1024 * 1024 * 1024
RSS_SECOND_PASS_MAX = 300 * 1024 * 1024


@dataclass
class Case:
    """One hostile record, the reply expected from city.dlq, and where it landed."""

    kind: str
    modality: str  # text | image | audio
    value: bytes
    stage: str
    reason: str
    where: tuple[str, int, int] = ("", -1, -1)  # topic, partition, offset
    good_id: str = ""


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def _audio(fmt: str, codec: str, seconds: float, rate: int = 16_000) -> bytes:
    """``seconds`` of a quiet tone in container ``fmt`` with encoder ``codec`` (PyAV)."""
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.1 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)[None, :]
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        assert isinstance(stream, av.AudioStream)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buf.getvalue()


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _text(**kw: Any) -> dict[str, Any]:
    return event(text="Smoke and flames from a shop on the main square", **kw)


def _frame(media: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return event(camera_id="cam-hostile", media=media, **kw)


def _call(media: dict[str, Any]) -> dict[str, Any]:
    return event(call_id="call-hostile", media=media)


def _corpus(root: Path) -> list[Case]:
    """The hostile kinds; ``root`` is the media root, with a FIFO and an escaping symlink."""
    limits = defaults().limits
    root.mkdir()
    (root / "good.jpg").write_bytes(GOOD_JPG.read_bytes())
    jpg = GOOD_JPG.read_bytes()
    os.mkfifo(root / "fifo.jpg")
    (root / "escape.jpg").symlink_to("/etc/passwd")
    (root / "zero.jpg").symlink_to("/dev/zero")
    nan_loc = _json(_text()).replace(b'"source"', b'"location": {"lat": NaN, "lon": 9.2}, "source"')
    deep = b"[" * 200_000 + b"]" * 200_000  # 400 KB: killed the text service before
    uri = f"file://{root}"
    return [
        Case("deep_json_array", "text", deep, "validate", "json_too_deep"),
        Case(
            "deep_json_in_field",
            "text",
            _json(_text()).replace(b'"source"', b'"x": ' + b"[" * 40 + b"]" * 40 + b', "source"'),
            "validate",
            "json_too_deep",
        ),
        Case(
            "huge_json",
            "text",
            _json(_text(note="a" * (limits.message_bytes + 10))),
            "validate",
            "payload_too_large",
        ),
        Case("bad_utf8", "text", b'{"text": "\xff\xfe\xfa"}', "validate", "json_invalid"),
        Case("not_json", "text", b"\x00\x01 not json", "validate", "json_invalid"),
        Case("json_not_object", "text", b"[1, 2, 3]", "validate", "schema_invalid"),
        Case(
            "wrong_types",
            "text",
            _json({**_text(), "text": ["a"], "event_id": 12}),
            "validate",
            "schema_invalid",
        ),
        Case(
            "ts_far_future",
            "text",
            _json(_text(ts="9999-12-31T00:00:00Z")),
            "validate",
            "ts_out_of_range",
        ),
        Case(
            "ts_ancient",
            "text",
            _json(_text(ts="0001-01-01T00:00:00Z")),
            "validate",
            "ts_out_of_range",
        ),
        Case("nan_coordinates", "text", nan_loc, "validate", "schema_invalid"),
        Case(
            "oversized_id",
            "text",
            _json({**_text(), "event_id": "x" * 5000}),
            "validate",
            "field_too_long",
        ),
        Case(
            "oversized_string_field",
            "text",
            _json({**_text(), "area": "z" * 100_000}),
            "validate",
            "field_too_long",
        ),
        Case(
            "truncated_jpeg",
            "image",
            _json(_frame({"content_type": "image/jpeg", "data_b64": _b64(jpg[: len(jpg) // 3])})),
            "decode",
            "image_decode_error",
        ),
        Case(
            "corrupt_jpeg",
            "image",
            _json(
                _frame(
                    {
                        "content_type": "image/jpeg",
                        "data_b64": _b64(b"\xff\xd8\xff\xe0" + os.urandom(5000)),
                    }
                )
            ),
            "decode",
            "image_decode_error",
        ),
        Case(
            "huge_image_header",
            "image",
            _json(
                _frame({"content_type": "image/png", "data_b64": _b64(_png_header(60_000, 60_000))})
            ),
            "decode",
            "image_too_large",
        ),
        Case(
            "odd_shape_4000000x10_png",
            "image",
            _json(_frame({"content_type": "image/png", "data_b64": _b64(_png(4_000_000, 10))})),
            "decode",
            "image_bad_shape",
        ),
        Case(
            "wrong_image_content_type",
            "image",
            _json(_frame({"content_type": "image/gif", "data_b64": _b64(jpg)})),
            "validate",
            "schema_invalid",
        ),
        Case(
            "bad_base64",
            "image",
            _json(_frame({"content_type": "image/jpeg", "data_b64": "!!not*base64" * 10})),
            "decode",
            "base64_invalid",
        ),
        Case(
            "uri_dev_zero",
            "image",
            _json(_frame({"content_type": "image/jpeg", "uri": "file:///dev/zero"})),
            "decode",
            "uri_outside_media_root",
        ),
        Case(
            "uri_symlink_to_dev_zero",
            "image",
            _json(_frame({"content_type": "image/jpeg", "uri": f"{uri}/zero.jpg"})),
            "decode",
            "uri_outside_media_root",
        ),
        Case(
            "uri_symlink_escape",
            "image",
            _json(_frame({"content_type": "image/jpeg", "uri": f"{uri}/escape.jpg"})),
            "decode",
            "uri_outside_media_root",
        ),
        Case(
            "uri_dotdot",
            "image",
            _json(_frame({"content_type": "image/jpeg", "uri": f"{uri}/../{root.name}/good.jpg"})),
            "decode",
            "uri_path_invalid",
        ),
        Case(
            "uri_fifo",
            "image",
            _json(_frame({"content_type": "image/jpeg", "uri": f"{uri}/fifo.jpg"})),
            "decode",
            "media_not_regular_file",
        ),
        Case(
            "uri_http",
            "image",
            _json(_frame({"content_type": "image/jpeg", "uri": "http://example.invalid/x.jpg"})),
            "decode",
            "unsupported_uri",
        ),
        Case(
            "random_audio",
            "audio",
            _json(_call({"content_type": "audio/ogg", "data_b64": _b64(os.urandom(20_000))})),
            "decode",
            "audio_decode_error",
        ),
        Case(
            "long_audio_40s_wav",
            "audio",
            _json(
                _call(
                    {"content_type": "audio/wav", "data_b64": _b64(_audio("wav", "pcm_s16le", 40))}
                )
            ),
            "decode",
            "audio_too_long",
        ),
        Case(
            "odd_codec_mulaw_wav",
            "audio",
            _json(
                _call(
                    {
                        "content_type": "audio/wav",
                        "data_b64": _b64(_audio("wav", "pcm_mulaw", 2, 8000)),
                    }
                )
            ),
            "decode",
            "audio_codec_not_allowed",
        ),
        Case(
            "odd_container_matroska",
            "audio",
            _json(
                _call(
                    {
                        "content_type": "audio/ogg",
                        "data_b64": _b64(_audio("matroska", "pcm_s16le", 2)),
                    }
                )
            ),
            "decode",
            "audio_container_not_allowed",
        ),
        Case(
            "wrong_audio_content_type",
            "audio",
            _json(_call({"content_type": "video/mp4", "data_b64": _b64(GOOD_OGG.read_bytes())})),
            "validate",
            "schema_invalid",
        ),
    ]


def _good(modality: str, root: Path, n: int) -> dict[str, Any]:
    if modality == "text":
        return _text()
    if modality == "image":
        # Every other good frame comes by claim check from below the media root.
        if n % 2:
            return _frame({"content_type": "image/jpeg", "uri": f"file://{root}/good.jpg"})
        return _frame({"content_type": "image/jpeg", "data_b64": _b64(GOOD_JPG.read_bytes())})
    return _call({"content_type": "audio/ogg", "data_b64": _b64(GOOD_OGG.read_bytes())})


@dataclass
class Run:
    cases: list[Case]
    dlq: dict[tuple[str, int, int], dict[str, Any]]
    embedded: set[str]
    alive: dict[str, bool]
    rss: list[int]  # before pass 1, before pass 2, after pass 2
    seconds: float


@pytest.fixture(scope="module")
def run(
    settings: KafkaSettings, models: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Run]:
    root = tmp_path_factory.mktemp("media-root").resolve()
    (root / "good.jpg").write_bytes(GOOD_JPG.read_bytes())
    old_root = os.environ.get("CITYFUSE_MEDIA_ROOT")
    os.environ["CITYFUSE_MEDIA_ROOT"] = str(root)
    tag = uuid.uuid4().hex[:6]
    src = {m: f"test.hostile.{m}.{tag}" for m in ("text", "image", "audio")}
    ensure_topics(settings, tuple(topics.TopicSpec(t, partitions=2) for t in src.values()))
    stop = threading.Event()
    services: dict[str, BatchService] = {
        "text": TextService(settings, models.text, stop, group_id=f"hostile-text-{tag}"),
        "image": VisionService(settings, models.vision, stop, group_id=f"hostile-vision-{tag}"),
        "audio": SpeechService(
            settings, models.speech, models.text, stop, group_id=f"hostile-speech-{tag}"
        ),
    }
    for m, svc in services.items():
        svc.input_topics = (src[m],)
    threads = {m: threading.Thread(target=s.run, daemon=True) for m, s in services.items()}
    for t in threads.values():
        t.start()
    emb = reader(settings, topics.EMBEDDINGS)
    dlq = reader(settings, topics.DLQ)
    producer = make_producer(settings)
    embedded: set[str] = set()
    dead: dict[tuple[str, int, int], dict[str, Any]] = {}

    def drain(timeout_ms: int = 200) -> None:
        for recs in emb.poll(timeout_ms=timeout_ms).values():
            embedded.update(json.loads(r.value)["event_id"] for r in recs)
        for recs in dlq.poll(timeout_ms=timeout_ms).values():
            for r in recs:
                d = json.loads(r.value)
                if d["topic"] in src.values():
                    dead[(d["topic"], d["partition"], d["offset"])] = d

    def send(modality: str, value: bytes) -> tuple[str, int, int]:
        md = producer.send(src[modality], value=value).get(timeout=30)
        return src[modality], md.partition, md.offset

    try:
        # Warm-up: one good record of each kind, so the RSS baseline includes first-use costs.
        warm = [_good(m, root, 0) for m in src]
        for m, g in zip(src, warm, strict=True):
            send(m, _json(g))
        # Generous waits: a shared 2-core CI machine can be very slow; nothing here is timed.
        deadline = time.monotonic() + 900
        while not {g["event_id"] for g in warm} <= embedded and time.monotonic() < deadline:
            drain()
        missing = [m for m, g in zip(src, warm, strict=True) if g["event_id"] not in embedded]
        assert not missing, f"the {missing} services did not embed a good record"
        # The corpus twice: the first pass may still grow allocator pools and client buffers,
        # the second shows whether memory keeps growing with hostile input.
        cases: list[Case] = []
        rss: list[int] = []
        t0 = time.monotonic()
        for n_pass in range(2):
            rss.append(_rss())
            batch = _corpus(root / f"pass{n_pass}")
            for n, case in enumerate(batch):
                case.where = send(case.modality, case.value)
                good = _good(case.modality, root, n)
                case.good_id = good["event_id"]
                send(case.modality, _json(good))
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                drain()
                if all(c.where in dead and c.good_id in embedded for c in batch):
                    break
            cases += batch
        seconds = time.monotonic() - t0
        rss.append(_rss())
        alive = {m: t.is_alive() for m, t in threads.items()}
        yield Run(cases, dict(dead), set(embedded), alive, rss, seconds)
    finally:
        stop.set()
        for t in threads.values():
            t.join(30)
        producer.close()
        emb.close()
        dlq.close()
        if old_root is None:
            os.environ.pop("CITYFUSE_MEDIA_ROOT", None)
        else:
            os.environ["CITYFUSE_MEDIA_ROOT"] = old_root


def test_corpus_has_at_least_15_kinds(run: Run) -> None:
    assert len({c.kind for c in run.cases}) >= 15
    assert len(run.cases) == 2 * len({c.kind for c in run.cases})
    assert {c.modality for c in run.cases} == {"text", "image", "audio"}


def test_every_hostile_record_is_dead_lettered_with_its_reason(run: Run) -> None:
    got = {c.kind: run.dlq.get(c.where) for c in run.cases}
    assert {k: (d["stage"], d["reason"]) if d else None for k, d in got.items()} == {
        c.kind: (c.stage, c.reason) for c in run.cases
    }


def test_the_next_good_record_of_each_kind_is_processed(run: Run) -> None:
    missing = [c.kind for c in run.cases if c.good_id not in run.embedded]
    assert missing == []


def test_services_still_run(run: Run) -> None:
    assert run.alive == {"text": True, "image": True, "audio": True}


def test_memory_stays_bounded(run: Run) -> None:
    mib = [f"{r / 2**20:.0f}" for r in run.rss]
    print(f"hostile corpus: {len(run.cases)} records in {run.seconds:.1f}s, RSS MiB {mib}")
    assert run.rss[2] - run.rss[0] < RSS_GROWTH_MAX
    # The second pass of the same corpus must not keep growing like the first.
    assert run.rss[2] - run.rss[1] < RSS_SECOND_PASS_MAX


# -- in-process fuzzing of the JSON validation (fast, no broker) ------------------------------

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=50),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=20,
)
_field_names = st.sampled_from(
    [
        "event_id",
        "ts",
        "text",
        "source",
        "incident_id",
        "location",
        "area",
        "media",
        "camera_id",
        "call_id",
        "schema_version",
        "lat",
        "lon",
        "content_type",
        "data_b64",
        "uri",
        "lang",
    ]
)
_events = st.dictionaries(_field_names, _json_values, max_size=10)


@fuzz_settings(max_examples=100)
@given(value=st.one_of(_events, _json_values), schema=st.sampled_from(["text", "frame", "call"]))
def test_fuzzed_json_is_accepted_or_rejected_never_raises(value: Any, schema: str) -> None:
    models: dict[str, type[InputEvent]] = {
        "text": TextReport,
        "frame": CameraFrame,
        "call": HotlineCall,
    }
    model = models[schema]
    raw = json.dumps(value, allow_nan=True).encode()
    try:
        from_bytes(model, raw)
    except RejectedInput as e:
        assert e.stage == "validate" and e.reason


@fuzz_settings(max_examples=300)
@given(raw=st.binary(max_size=2000))
def test_fuzzed_bytes_are_accepted_or_rejected_never_raise(raw: bytes) -> None:
    with contextlib.suppress(RejectedInput):
        from_bytes(TextReport, raw)


@fuzz_settings(max_examples=200)
@given(
    depth=st.integers(min_value=0, max_value=200),
    opener=st.sampled_from(["[", '{"a":']),
    in_string=st.booleans(),
)
def test_json_depth_guard_matches_the_real_nesting(
    depth: int, opener: str, in_string: bool
) -> None:
    closer = "]" if opener == "[" else "}"
    nested = opener * depth + "1" + closer * depth
    doc = json.dumps({"text": nested}) if in_string else '{"text": ' + nested + "}"
    assert json_depth(doc.encode()) == (1 if in_string else depth + 1)
    try:
        from_bytes(TextReport, doc.encode())
    except RejectedInput as e:
        too_deep = not in_string and depth + 1 > defaults().limits.json_depth
        assert (e.reason == "json_too_deep") == too_deep


@fuzz_settings(max_examples=100)
@given(
    text=st.text(min_size=1, max_size=300).filter(str.strip),
    event_id=st.text(min_size=1, max_size=200),
    lat=st.floats(min_value=-90, max_value=90),
    lon=st.floats(min_value=-180, max_value=180),
)
def test_valid_reports_round_trip(text: str, event_id: str, lat: float, lon: float) -> None:
    msg = TextReport(
        event_id=event_id, ts=utc_now(), text=text, location=Location(lat=lat, lon=lon)
    )
    assert from_bytes(TextReport, to_bytes(msg)) == msg


def test_the_vision_service_decodes_frames_no_smaller_than_its_encoder_reads(
    settings: KafkaSettings, models: Any
) -> None:
    import io

    from PIL import Image

    from models.images import ImageLimits, decode_image

    svc = VisionService(settings, models.vision, threading.Event(), group_id="draft-check")
    buf = io.BytesIO()
    Image.new("RGB", (1920, 1080), (90, 120, 40)).save(buf, format="JPEG")
    size = models.vision.size
    assert min(decode_image(buf.getvalue(), svc.limits).size) >= size
    if size > ImageLimits().draft_px:  # the configured draft alone would decode too small
        assert min(decode_image(buf.getvalue(), ImageLimits()).size) < size
