"""docker/ matches the code: the compose services are the CLI's services, the topics created
are those of streams/topics.py, Kafka is a 3-node KRaft cluster with RF 3 / min ISR 2, and
Prometheus scrapes every service. No container engine runs here, so the files are checked."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.cli import SERVICES
from streams import topics

DOCKER = Path(__file__).resolve().parent.parent / "docker"
APP_SERVICES = {s for s in SERVICES if s != "all"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DOCKER / "compose.yaml").read_text()))


def _kafka(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if n.startswith("kafka-")}


def test_kafka_is_three_kraft_nodes_with_rf3_and_min_isr2(compose: dict[str, Any]) -> None:
    kafka = _kafka(compose)
    assert sorted(kafka) == ["kafka-1", "kafka-2", "kafka-3"]
    ids = set()
    for name, svc in kafka.items():
        env = svc["environment"]
        assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
        assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{name}:9092"
        voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
        assert sorted(v.split("@")[1] for v in voters) == [f"{k}:9093" for k in sorted(kafka)]
        ids.add(env["KAFKA_NODE_ID"])
        # Inline frames: the broker must take what the clients may send.
        assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) >= 12_582_912
    assert ids == {"1", "2", "3"}


def test_each_cli_service_is_its_own_scalable_container(compose: dict[str, Any]) -> None:
    app = {
        n: s
        for n, s in compose["services"].items()
        if isinstance(s.get("command"), list) and s["command"][:1] == ["serve"]
    }
    assert set(app) == APP_SERVICES
    brokers = ",".join(f"{k}:9092" for k in sorted(_kafka(compose)))
    for name, svc in app.items():
        cmd = svc["command"]
        assert cmd[1] == name
        assert cmd[cmd.index("--bootstrap-servers") + 1] == brokers
        assert "--metrics-port" in cmd
        assert "container_name" not in svc, "a fixed container name prevents --scale"
        assert svc["build"]["dockerfile"] == "docker/Dockerfile"
        assert svc["depends_on"]["topic-init"]["condition"] == "service_completed_successfully"
        assert svc["environment"]["CITYFUSE_METRICS_ADDR"] == "0.0.0.0"


def test_topic_init_creates_the_topics_of_streams_topics(compose: dict[str, Any]) -> None:
    script = compose["services"]["topic-init"]["command"][0]
    assert "--replication-factor 3" in script and "min.insync.replicas=2" in script
    created = {
        m["name"]: (int(m["partitions"]), int(m["retention"]))
        for m in re.finditer(
            r"--topic (?P<name>\S+) --partitions (?P<partitions>\d+) "
            r"--config retention\.ms=(?P<retention>\d+)",
            script,
        )
    }
    assert created == {t.name: (t.partitions, t.retention_ms) for t in topics.ALL_TOPICS}
    assert all(p >= 2 for p, _ in created.values()), "scale-out needs partitions"


def test_prometheus_scrapes_every_service(compose: dict[str, Any]) -> None:
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    [job] = prom["scrape_configs"]
    [sd] = job["dns_sd_configs"]
    assert set(sd["names"]) == APP_SERVICES
    ports = {
        s["command"][s["command"].index("--metrics-port") + 1]
        for n, s in compose["services"].items()
        if n in APP_SERVICES
    }
    assert ports == {str(sd["port"])}
    assert "prometheus" in compose["services"]


def test_image_is_non_root_and_bakes_the_weights() -> None:
    lines = [ln.strip() for ln in (DOCKER / "Dockerfile").read_text().splitlines() if ln.strip()]
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    after_user = lines[lines.index(f"USER {users[-1]}") :]
    assert any("cityfuse convert-weights" in ln for ln in after_user)
    assert any("pip install" in ln and " -e " not in ln for ln in lines)


def test_compose_client_accepts_the_file() -> None:
    # No container engine here, but a compose client validates the file when one exists.
    client = (
        ["docker", "compose"]
        if shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
        else ["docker-compose"]
        if shutil.which("docker-compose")
        else None
    )
    if client is None:
        # Still check the file is the YAML a client would read (anchors resolved, no tabs).
        assert yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
        return
    proc = subprocess.run(
        [*client, "-f", str(DOCKER / "compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=DOCKER,
    )
    assert proc.returncode == 0, proc.stderr
