"""Connection settings and the producer/consumer/admin factories every service uses."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError
from pydantic import BaseModel

from streams import topics
from streams.broker import EmbeddedBroker

# Frames travel inline: both limits go up together (STACK-NOTES §6, "Message size").
MAX_REQUEST_BYTES = 16 * 1024 * 1024
MAX_PARTITION_FETCH_BYTES = 16 * 1024 * 1024
FETCH_MAX_BYTES = 64 * 1024 * 1024


class KafkaSettings(BaseModel):
    """Where the cluster is and how to authenticate. ``bootstrap_servers=None`` = embedded broker."""

    bootstrap_servers: str | None = None
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    # Local Tansu delays a group join by about session_timeout/2: keep it short here.
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 2000
    # Whether a closing group member sends LeaveGroup. Off: a departure is noticed by the
    # session timeout instead, exactly like a crash (see ``make_consumer`` for why).
    leave_group_on_close: bool = False

    def common(self) -> dict[str, Any]:
        """Keyword arguments shared by every kafka-python client."""
        if self.bootstrap_servers is None:
            raise ValueError("bootstrap_servers is not set (start the embedded broker first)")
        kw: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "security_protocol": self.security_protocol,
        }
        optional = {
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_plain_username": self.sasl_username,
            "sasl_plain_password": self.sasl_password,
            "ssl_cafile": self.ssl_cafile,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
        }
        kw.update({k: v for k, v in optional.items() if v is not None})
        return kw


def make_producer(settings: KafkaSettings, **overrides: Any) -> KafkaProducer:
    """A producer with acks=all, idempotence and room for inline frames."""
    kw: dict[str, Any] = {
        "acks": "all",
        "linger_ms": 5,
        "batch_size": 1024 * 1024,
        "max_request_size": MAX_REQUEST_BYTES,
        "enable_idempotence": True,
    }
    kw.update(overrides)
    return KafkaProducer(**settings.common(), **kw)


def make_consumer(
    settings: KafkaSettings, group_id: str | None, *topic_names: str, **overrides: Any
) -> KafkaConsumer:
    """A consumer that starts at the earliest offset and commits only when told to."""
    kw: dict[str, Any] = {
        "group_id": group_id,
        "auto_offset_reset": "earliest",
        "enable_auto_commit": False,
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms,
        "max_partition_fetch_bytes": MAX_PARTITION_FETCH_BYTES,
        "fetch_max_bytes": FETCH_MAX_BYTES,
    }
    kw.update(overrides)
    consumer = KafkaConsumer(*topic_names, **settings.common(), **kw)
    if group_id is not None and not settings.leave_group_on_close:
        _never_leave_group(consumer)
    return consumer


def _never_leave_group(consumer: KafkaConsumer) -> None:
    """Make ``consumer`` leave its group silently: forget the membership locally, send no
    LeaveGroup; the coordinator evicts the member when its session times out.

    Why (issue 11, the chaos run's stalled vision group): Tansu, the embedded broker, wedges a
    group for good when its *leader* sends LeaveGroup while the group is rebalancing
    ("Forming"). Its Forming-state ``leave`` removes the member but keeps it as ``leader``
    (tansu-broker/src/coordinator/group/administrator.rs at 510f3e2; the Formed-state
    ``leave`` and the session-timeout eviction both clear it). From then on every JoinGroup
    names the departed leader, nobody is elected, each SyncGroup answers
    RebalanceInProgress, and no member of the group is ever assigned a partition again:
    consumption and commits stop, restarting the survivors does not help. That is the
    chaos run's stalled vision group (committed offsets stuck at 112 of 641 frames after
    vision#2 left): vision#2 leads once vision#1 is SIGKILLed and evicted, the restarted
    vision#1 joining starts a rebalance, and vision#2's SIGTERM sends LeaveGroup during it.
    Reproduced with plain members (tests/test_chaos.py): LeaveGroup from the leader one
    second after another member's JoinGroup, and the joiner is never assigned anything.

    Eviction by session timeout clears a departed leader correctly (it is the path every
    SIGKILL takes), so members here never send LeaveGroup, on ``close()``, ``unsubscribe()``
    or kafka-python's own leave after ``max_poll_interval_ms``. The cost is a rebalance that
    starts ``session_timeout_ms`` later. Kafka Streams makes the same choice for its own
    consumers (``internal.leave.group.on.close=false``) to spare rolling restarts a rebalance.
    """
    coordinator = consumer._coordinator

    async def forget(reason: str | None = None, timeout_ms: int | None = None) -> None:
        coordinator.reset_generation()

    # kafka-python 3.0.12 routes every leave through this coroutine (close, unsubscribe and
    # the heartbeat thread's poll-timeout leave): replace it on this instance only.
    coordinator.maybe_leave_group_async = forget


def assign_all(consumer: KafkaConsumer, *topic_names: str) -> list[TopicPartition]:
    """Assign every partition of ``topic_names`` to a group-less consumer (no join delay)."""
    tps = [
        TopicPartition(t, p)
        for t in topic_names
        for p in sorted(consumer.partitions_for_topic(t) or [])
    ]
    consumer.assign(tps)
    return tps


def assign_all_at_end(consumer: KafkaConsumer, *topic_names: str) -> list[TopicPartition]:
    """Like :func:`assign_all`, positioned at each partition's end as of now.

    kafka-python's ``seek_to_end()`` is lazy: the end is looked up at the first poll, so
    records written between the call and that poll were skipped (a benchmark's first
    embeddings went missing that way). The offsets are fetched here instead."""
    tps = assign_all(consumer, *topic_names)
    for tp, end in consumer.end_offsets(tps).items():
        consumer.seek(tp, end)
    return tps


def ensure_topics(
    settings: KafkaSettings, specs: tuple[topics.TopicSpec, ...] = topics.ALL_TOPICS
) -> None:
    """Create the pipeline's topics that do not exist yet."""
    admin = KafkaAdminClient(**settings.common())
    try:
        existing = set(admin.list_topics())
        new = [
            NewTopic(
                s.name,
                num_partitions=s.partitions,
                replication_factor=1,
                topic_configs={"retention.ms": str(s.retention_ms)},
            )
            for s in specs
            if s.name not in existing
        ]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(new)
    finally:
        admin.close()


@contextlib.contextmanager
def cluster(settings: KafkaSettings) -> Iterator[KafkaSettings]:
    """Yield settings for a ready cluster with all topics: the given one, or a fresh embedded broker."""
    if settings.bootstrap_servers is not None:
        ensure_topics(settings)
        yield settings
        return
    with EmbeddedBroker() as broker:
        live = settings.model_copy(update={"bootstrap_servers": broker.bootstrap_servers})
        ensure_topics(live)
        yield live
