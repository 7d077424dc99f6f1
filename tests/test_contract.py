"""Message contract, serde and correlation: pure functions, checked with properties."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.correlation import alert_id
from streams.errors import RejectedInput
from streams.schemas import TextReport, decode_vector, encode_vector
from streams.serde import from_bytes, to_bytes
from streams.taxonomy import label_names


def report(**kw: object) -> bytes:
    base = {"schema_version": 1, "event_id": "e1", "ts": "2026-11-29T08:00:00Z", "text": "fire"}
    return json.dumps({**base, **kw}).encode()


def test_taxonomy_has_the_seven_labels_in_order() -> None:
    assert label_names() == [
        "traffic_accident",
        "fire",
        "flood",
        "infrastructure_damage",
        "public_safety",
        "medical_emergency",
        "no_incident",
    ]


@given(
    st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=64)
)
def test_vector_roundtrip(values: list[float]) -> None:
    v = np.array(values, dtype=np.float32)
    assert np.array_equal(decode_vector(encode_vector(v), len(v)), v)


def test_vector_with_wrong_dim_is_refused() -> None:
    with pytest.raises(ValueError):
        decode_vector(encode_vector(np.zeros(4, np.float32)), 5)


@given(st.text(min_size=1, max_size=200), st.floats(-90, 90), st.floats(-180, 180))
def test_valid_reports_roundtrip(text: str, lat: float, lon: float) -> None:
    msg = from_bytes(TextReport, report(text=text, location={"lat": lat, "lon": lon}))
    assert from_bytes(TextReport, to_bytes(msg)) == msg


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"text": ""}, "schema_invalid"),
        ({"text": "x" * 10_001}, "field_too_long"),
        ({"text": 5}, "schema_invalid"),
        ({"location": {"lat": 91, "lon": 0}}, "schema_invalid"),
        ({"ts": "yesterday"}, "schema_invalid"),
        ({"schema_version": 2}, "unsupported_schema_version"),
    ],
)
def test_invalid_reports_are_rejected_with_reason(fields: dict[str, object], reason: str) -> None:
    with pytest.raises(RejectedInput) as e:
        from_bytes(TextReport, report(**fields))
    assert e.value.reason == reason
    assert e.value.stage == "validate"


def test_unknown_fields_are_ignored_and_oversize_refused() -> None:
    assert from_bytes(TextReport, report(extra={"a": 1})).text == "fire"
    with pytest.raises(RejectedInput) as e:
        from_bytes(TextReport, report(), max_bytes=10)
    assert e.value.reason == "payload_too_large"


def test_alert_id_is_deterministic() -> None:
    assert alert_id("inc:A", "e1") == alert_id("inc:A", "e1")
    assert alert_id("inc:A", "e1") != alert_id("inc:A", "e2")


def test_committed_json_schemas_match_the_models() -> None:
    from scripts.export_schemas import OUT, schemas

    for name, text in schemas().items():
        assert (OUT / name).read_text() == text, (
            f"docs/schemas/{name} is stale: run scripts/export_schemas.py"
        )
