"""Soak benchmark (not a test): the pipeline at half its measured capacity for N minutes.

    python -m benchmarks.soak --minutes 30 --out out/soak.json

Starts the embedded broker and the whole pipeline in this process, measures capacity with a
burst (events per second until every event is embedded or dead-lettered), then feeds scattered
incidents at half that rate, sampling every minute: this process's RSS, the broker's RSS, the
p99 ingest-to-alert latency of the minute's alerts, and fusion's open incidents. Goal: less than
10% growth of RSS and of p99 from the first steady minute to the last.

Fusion's TTL is shortened (``--ttl``, default 300 s) so that state reaches its steady size
within the run; with the configured hour, a 30-minute run would only measure state filling up.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from services.runtime import Models, Pipeline
from services.scatter import ScatterPlan, write_scattered
from streams import topics
from streams.clients import KafkaSettings, assign_all_at_end, cluster, make_consumer, make_producer
from streams.console import console, progress
from streams.recording import inline_media, read_recording, record_key
from streams.schemas import parse_ts, utc_now

_M_PER_DEG = 111_320.0


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size of a process in MiB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Pool:
    """A scattered recording kept in memory, re-sent with fresh ids, times and places."""

    def __init__(self, folder: Path) -> None:
        _, events = read_recording(folder)
        self.items = [(ev.topic, inline_media(ev.message, folder), ev.t) for ev in events]
        self.span = max(t for _, _, t in self.items) + 1.0
        self.loop = 0

    def messages(self) -> list[tuple[str, dict[str, Any], float]]:
        """One pass: new event ids, event time now, places moved 3 km north per pass
        (so a pass never joins the incidents of the previous one)."""
        out = []
        for topic, msg, t in self.items:
            m = dict(msg)
            m["event_id"] = f"{msg['event_id']}-L{self.loop}"
            m["ts"] = utc_now()
            loc = msg.get("location")
            if isinstance(loc, dict):
                lat = loc["lat"] + ((self.loop % 200) * 3000) / _M_PER_DEG
                m["location"] = {"lat": lat, "lon": loc["lon"]}
            out.append((topic, m, t))
        self.loop += 1
        return out


@dataclass
class Watch:
    """Reads alerts and embeddings as they come (group-less), keeping only small counters."""

    settings: KafkaSettings
    latencies: list[float] = field(default_factory=list)
    embedded: int = 0
    dead: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Watch:
        threading.Thread(target=self._run, daemon=True, name="watch").start()
        return self

    def _run(self) -> None:
        c = make_consumer(self.settings, None)
        assign_all_at_end(c, topics.ALERTS, topics.EMBEDDINGS, topics.DLQ)
        try:
            while not self.stop.is_set():
                for tp, recs in c.poll(timeout_ms=200).items():
                    with self.lock:
                        if tp.topic == topics.EMBEDDINGS:
                            self.embedded += len(recs)
                        elif tp.topic == topics.DLQ:
                            self.dead += len(recs)
                        else:
                            for r in recs:
                                a = json.loads(r.value)
                                if a.get("last_ingest_ts"):
                                    lag = parse_ts(a["emitted_ts"]) - parse_ts(a["last_ingest_ts"])
                                    self.latencies.append(lag.total_seconds() * 1000)
        finally:
            c.close()

    def take_latencies(self) -> list[float]:
        with self.lock:
            out, self.latencies = self.latencies, []
        return out


def _send(producer: Any, topic: str, msg: dict[str, Any]) -> None:
    key = record_key(topic, msg)
    producer.send(
        topic,
        key=key.encode() if key else None,
        value=json.dumps(msg, separators=(",", ":")).encode(),
    )


def capacity(live: KafkaSettings, pool: Pool, watch: Watch, passes: int = 1) -> float:
    """Inputs per second the pipeline absorbs in a burst of ``passes`` pool passes (until 98%
    are out as embeddings or dead letters). Embedding records are counted, and a border event
    has several: the count is divided by the pool's copies per input."""
    producer = make_producer(live)
    sent, start_e, start_d = 0, watch.embedded, watch.dead
    t0 = time.monotonic()
    for _ in range(passes):
        for topic, msg, _ in pool.messages():
            _send(producer, topic, msg)
            sent += 1
    producer.flush(timeout=60)
    producer.close(timeout=60)
    copies = _copies_per_input(pool)
    while time.monotonic() - t0 < 900:
        done = (watch.embedded - start_e) / copies + (watch.dead - start_d)
        if done >= sent * 0.98:
            break
        time.sleep(0.5)
    return sent / (time.monotonic() - t0)


def _copies_per_input(pool: Pool) -> float:
    from streams.correlation import routing_keys
    from streams.schemas import InputEvent

    n = [len(routing_keys(InputEvent.model_validate(m))) for _, m, _ in pool.items]
    return float(np.mean(n)) if n else 1.0


def broker_pid(port: str) -> int | None:
    """The pid of the Tansu process listening on ``port`` (for its RSS)."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"tansu") and any(port.encode() in c for c in cmd):
                return int(d.name)
    return None


def soak(minutes: float, out: Path, ttl_s: float, rate: float | None) -> dict[str, Any]:
    """Run the soak and write ``out``; returns the result."""
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    folder = write_scattered(
        Path(tempfile.mkdtemp(prefix="soak-")) / "pool",
        ScatterPlan(incidents=40, calls=0.02, frames=0.3, stagger_s=3.0, seed=23),
    )
    pool = Pool(folder)
    models = Models.load()
    with cluster(KafkaSettings()) as live:
        assert live.bootstrap_servers is not None
        bpid = broker_pid(live.bootstrap_servers.rsplit(":", 1)[1])
        watch = Watch(live).start()
        with Pipeline(live, models, fusion_kw={"ttl_s": ttl_s}) as pipe:
            fusion = next(s for s in pipe.services if s.name == "fusion")
            cap = capacity(live, pool, watch)
            target = rate or cap / 2
            console.print(f"capacity {cap:.1f} inputs/s; soaking at {target:.1f} inputs/s")
            watch.take_latencies()
            samples = _feed(
                live, pool, watch, fusion, bpid, minutes, target, out.with_suffix(".samples.json")
            )
            watch.stop.set()
    first = samples[min(1, len(samples) - 1)]  # minute 1 is warm-up
    last = samples[-1]
    result = {
        "minutes": minutes,
        "capacity_inputs_per_s": cap,
        "rate_inputs_per_s": target,
        "ttl_s": ttl_s,
        "cpu_count": os.cpu_count(),
        "load_avg_start_end": [samples[0]["load1"], last["load1"]],
        "samples": samples,
        "rss_growth": last["rss_mb"] / first["rss_mb"] - 1,
        "p99_growth": (last["p99_ms"] / first["p99_ms"] - 1) if first["p99_ms"] else None,
        "broker_rss_growth": (last["broker_rss_mb"] / first["broker_rss_mb"] - 1)
        if first["broker_rss_mb"]
        else None,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    _print(result)
    return result


def _feed(
    live: KafkaSettings,
    pool: Pool,
    watch: Watch,
    fusion: Any,
    bpid: int | None,
    minutes: float,
    rate: float,
    log: Path,
) -> list[dict[str, Any]]:
    producer = make_producer(live)
    samples: list[dict[str, Any]] = []
    t0 = time.monotonic()
    sent = 0
    batch: list[tuple[str, dict[str, Any], float]] = []
    total = int(minutes * 60)
    with progress() as bar:
        task = bar.add_task(f"soak at {rate:.1f} inputs/s", total=total)
        next_sample = t0 + 60
        while time.monotonic() - t0 < minutes * 60:
            if not batch:
                batch = pool.messages()
            due = t0 + sent / rate
            time.sleep(max(0.0, due - time.monotonic()))
            topic, msg, _ = batch.pop(0)
            msg["ts"] = utc_now()  # event time = now: incidents stay open as in real traffic
            _send(producer, topic, msg)
            sent += 1
            if time.monotonic() >= next_sample:
                next_sample += 60
                lat = watch.take_latencies()
                samples.append(
                    {
                        "minute": len(samples) + 1,
                        "sent": sent,
                        "rss_mb": rss_mb(),
                        "broker_rss_mb": rss_mb(bpid) if bpid else 0.0,
                        "p99_ms": float(np.percentile(lat, 99)) if lat else 0.0,
                        "p50_ms": float(np.percentile(lat, 50)) if lat else 0.0,
                        "alert_versions": len(lat),
                        "open_incidents": len(fusion.incidents),
                        "load1": os.getloadavg()[0],
                    }
                )
                # Written as they come: a run cut short keeps its minutes.
                log.write_text(json.dumps(samples, indent=1))
            bar.update(task, completed=min(total, int(time.monotonic() - t0)))
    producer.flush(timeout=60)
    producer.close(timeout=60)
    return samples


def _print(result: dict[str, Any]) -> None:
    t = Table(title=f"soak: {result['minutes']} min at {result['rate_inputs_per_s']:.1f} inputs/s")
    for c in (
        "minute",
        "sent",
        "RSS MiB",
        "broker MiB",
        "p50 ms",
        "p99 ms",
        "alerts",
        "open",
        "load",
    ):
        t.add_column(c, justify="right")
    for s in result["samples"]:
        t.add_row(
            str(s["minute"]),
            str(s["sent"]),
            f"{s['rss_mb']:.0f}",
            f"{s['broker_rss_mb']:.0f}",
            f"{s['p50_ms']:.0f}",
            f"{s['p99_ms']:.0f}",
            str(s["alert_versions"]),
            str(s["open_incidents"]),
            f"{s['load1']:.1f}",
        )
    console.print(t)
    g = result["p99_growth"]
    console.print(
        f"RSS growth {result['rss_growth']:+.1%}, p99 growth "
        f"{'n/a' if g is None else f'{g:+.1%}'} (goal < 10% each, minute 2 to the last)"
    )


def main() -> None:
    """Command line: ``python -m benchmarks.soak --minutes 30``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--out", type=Path, default=Path("out/soak.json"))
    ap.add_argument("--ttl", type=float, default=300.0, help="fusion TTL for the run (s)")
    ap.add_argument("--rate", type=float, default=None, help="inputs/s (default: capacity / 2)")
    args = ap.parse_args()
    soak(args.minutes, args.out, args.ttl, args.rate)


if __name__ == "__main__":
    main()
