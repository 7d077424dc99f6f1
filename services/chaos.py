"""``cityfuse chaos``: replay scattered incidents while service processes crash, join and leave.

Every service runs as its own ``cityfuse serve`` process against one broker (embedded here, or
``--bootstrap-servers``). While the events are replayed, each service process is SIGKILLed in
turn and restarted, and a second fusion and a second vision instance join the groups and then
leave them. Afterwards the run is accounted for:

* every input ends as an embedding or a dead letter;
* each truth incident has exactly one alert id (after following ``supersedes``);
* no (alert_id, version) is published twice with different content.

Each process writes its log (``-v``: the Kafka client's joins, assignments and refused
commits) to ``<workdir>/logs/<service>-<n>.log``, and ``logs/offsets.log`` samples every
group's committed offsets every 5 s: a group that stops committing shows there.
"""

from __future__ import annotations

import base64
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient
from rich.table import Table

from services.eval_incidents import alerts_by_event
from services.runtime import Collector
from services.scatter import ScatterPlan, write_scattered
from streams import topics
from streams.clients import KafkaSettings, cluster, make_producer
from streams.console import console, progress
from streams.recording import inline_media, read_recording, record_key
from streams.schemas import Alert

# Content of an alert version, without the fields that say *when* it was sent.
_VOLATILE = ("emitted_ts",)
# Settling gives up when neither inputs nor alerts moved for this long.
STALL_S = 600.0


class OffsetLog:
    """Samples the services' committed group offsets into ``offsets.log`` every few seconds
    (what a stalled member looks like from the broker's side)."""

    GROUPS = ("cityfuse-text", "cityfuse-vision", "cityfuse-speech", "cityfuse-fusion")

    def __init__(self, settings: KafkaSettings, path: Path, every_s: float = 5.0) -> None:
        self.settings, self.path, self.every_s = settings, path, every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="offset-log", daemon=True)

    def _run(self) -> None:
        admin = KafkaAdminClient(**self.settings.common())
        t0 = time.monotonic()
        try:
            with self.path.open("a") as out:
                while not self.stop.wait(self.every_s):
                    parts = []
                    for g in self.GROUPS:
                        try:
                            got = admin.list_group_offsets(g)
                        except Exception as e:  # a broker hiccup must not end the run
                            parts.append(f"{g}=error:{type(e).__name__}")
                            continue
                        offs = got.get(g, got) if isinstance(got, dict) else {}
                        cells = ",".join(
                            f"{tp.topic.rsplit('.', 1)[-1]}[{tp.partition}]={o.offset}"
                            for tp, o in sorted(offs.items())
                        )
                        parts.append(f"{g.removeprefix('cityfuse-')} {cells}")
                    out.write(f"{time.monotonic() - t0:7.1f}s  " + "  ".join(parts) + "\n")
                    out.flush()
        finally:
            admin.close()

    def start(self) -> OffsetLog:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


class Proc:
    """One ``cityfuse serve <service>`` process, its log and its lifecycle."""

    def __init__(self, service: str, bootstrap: str, logdir: Path, n: int) -> None:
        self.service, self.bootstrap, self.n = service, bootstrap, n
        self.log_path = logdir / f"{service}-{n}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def name(self) -> str:
        return f"{self.service}#{self.n}"

    def start(self) -> Proc:
        """Launch (again); the log file is appended to."""
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
        # -v: the client's own story (joins, assignments, commits refused) lands in the log.
        cmd = [sys.executable, "-m", "services.cli", "-v", "serve", self.service]
        cmd += ["--bootstrap-servers", self.bootstrap]
        with self.log_path.open("ab") as log:
            log.write(f"\n--- start {self.starts} ---\n".encode())
            self.popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.starts += 1
        return self

    def serving(self) -> bool:
        """Whether the latest start has loaded its models and begun serving."""
        text = self.log_path.read_text(errors="replace")
        return "serving " in text.rsplit(f"--- start {self.starts - 1} ---", 1)[-1]

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: no commit, no goodbye to the group."""
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM: finish the batch, commit, leave the group."""
        if self.popen is None:
            return None
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode


@dataclass
class ChaosReport:
    """What went in, what came out, and what went wrong."""

    inputs: int = 0
    embeddings: int = 0
    dead_letters: int = 0
    missing: list[str] = field(default_factory=list)
    alerts: int = 0
    alert_versions: int = 0
    truth_incidents: int = 0
    incidents_without_alert: list[str] = field(default_factory=list)
    incidents_split: list[str] = field(default_factory=list)
    duplicate_versions: int = 0  # the same (alert_id, version) again, same content
    conflicting_versions: list[str] = field(default_factory=list)  # ... different content
    superseded: int = 0
    actions: list[str] = field(default_factory=list)
    seconds: float = 0.0
    timed_out: bool = False
    workdir: str = ""  # the recording, and logs/ with each process's log and offsets.log

    @property
    def ok(self) -> bool:
        """All three promises kept."""
        return not (
            self.missing
            or self.incidents_without_alert
            or self.incidents_split
            or self.conflicting_versions
        )

    def to_json(self) -> dict[str, Any]:
        """The report as plain JSON (lists shortened to examples)."""
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            out[k] = (
                v if not isinstance(v, list) or k == "actions" else {"n": len(v), "examples": v[:5]}
            )
        out["ok"] = self.ok
        return out


def _plan(events: int, seed: int) -> ScatterPlan:
    # About 5 reports per scene; a few calls (Whisper is the slow service) and broken frames.
    return ScatterPlan(
        incidents=max(4, events // 5),
        events=(4, 6),
        calls=0.03,
        frames=0.3,
        bad=0.02,
        stagger_s=6.0,
        seed=seed,
        prefix=f"chaos{seed}-{int(time.time())}",
    )


def _schedule() -> list[tuple[float, str, str]]:
    """(fraction of the replay, action, process) — each service killed in turn, two joiners.

    ``kill`` restarts the process at once; ``crash`` restarts it only once the group has
    rebalanced without it, so the survivor has become the group's leader. Each joiner then
    leaves while the restarted instance rejoins: the leader departs *during* a rebalance,
    the case that wedged Tansu groups for good before members stopped sending LeaveGroup
    (streams/clients.py ``_never_leave_group``)."""
    return [
        (0.10, "kill", "fusion"),
        (0.20, "join", "fusion2"),
        (0.30, "kill", "text"),
        (0.40, "join", "vision2"),
        (0.50, "crash", "vision"),
        (0.50, "leave", "vision2"),
        (0.70, "kill", "speech"),
        (0.90, "crash", "fusion"),
        (0.90, "leave", "fusion2"),
    ]


def run_chaos(
    settings: KafkaSettings,
    events: int = 2000,
    seed: int = 5,
    duration_s: float | None = None,
    settle_s: float = 3600.0,
    workdir: Path | None = None,
    stall_s: float = STALL_S,
    quiet_s: float = 10.0,
) -> ChaosReport:
    """Run the scenario and account for every input (see the module docstring).

    ``settle_s`` bounds the wait for the backlog after the replay, ``stall_s`` gives up
    earlier when nothing moves that long, and ``quiet_s`` is how long the alerts must stay
    unchanged once every input is accounted for (pending timers, last versions)."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="cityfuse-chaos-"))
    report = ChaosReport(workdir=str(workdir))
    t_start = time.monotonic()
    with cluster(settings) as live:
        assert live.bootstrap_servers is not None
        folder = write_scattered(workdir / "recording", _plan(events, seed))
        _, recorded = read_recording(folder)
        truth = {str(e.message["event_id"]): e for e in recorded}
        report.inputs = len(truth)
        report.truth_incidents = len({(e.truth or {}).get("incident_id") for e in recorded})
        logs = workdir / "logs"
        logs.mkdir(exist_ok=True)
        bs = live.bootstrap_servers
        procs = {s: Proc(s, bs, logs, 1) for s in ("text", "vision", "speech", "fusion")}
        extra = {"fusion2": Proc("fusion", bs, logs, 2), "vision2": Proc("vision", bs, logs, 2)}
        collector = Collector(live, topics.EMBEDDINGS, topics.ALERTS, topics.DLQ).start()
        offset_log = OffsetLog(live, logs / "offsets.log").start()
        try:
            with console.status("starting text, vision, speech and fusion processes"):
                for p in procs.values():
                    p.start()
                _wait_serving(list(procs.values()), 600)
                time.sleep(2 * live.session_timeout_ms / 1000)  # the group joins
            _replay_with_chaos(live, folder, procs, extra, report, duration_s or events / 8)
            collector, settled = _settle(live, collector, truth, report, settle_s, stall_s, quiet_s)
            report.timed_out = not settled
        finally:
            for p in [*procs.values(), *extra.values()]:
                p.stop()
            collector.close()
            offset_log.close()
        _account(collector, truth, report)
    report.seconds = time.monotonic() - t_start
    return report


def _wait_serving(procs: list[Proc], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [p.name for p in procs if not p.alive()]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited while starting (see its log)")
        if all(p.serving() for p in procs):
            return
        time.sleep(0.5)
    raise RuntimeError(f"services not serving after {timeout:.0f}s")


def _replay_with_chaos(
    live: KafkaSettings,
    folder: Path,
    procs: dict[str, Proc],
    extra: dict[str, Proc],
    report: ChaosReport,
    duration_s: float,
) -> None:
    """Send the recording evenly over ``duration_s`` while a second thread works through the
    schedule. An action waits for its share of the replay and for its target to be serving;
    the replay holds at that share until the action is done (its clock paused meanwhile), so
    every action has the rest of the traffic after it, whatever the actions cost."""
    _, events = read_recording(folder)
    # sent: events sent so far; allowed: how many the replay may send before the next action.
    sent, allowed = [0], [_threshold(_schedule()[0][0], len(events))]
    chaos = threading.Thread(
        target=_chaos, args=(procs, extra, report, sent, allowed, len(events), live), daemon=True
    )
    producer = make_producer(live)
    t0 = time.monotonic()
    chaos.start()
    try:
        with progress() as bar:
            task = bar.add_task("replay under chaos", total=len(events))
            for i, ev in enumerate(events):
                held = time.monotonic()
                while i >= allowed[0] and chaos.is_alive():
                    time.sleep(0.1)
                t0 += time.monotonic() - held
                due = t0 + duration_s * i / len(events)
                time.sleep(max(0.0, due - time.monotonic()))
                msg = inline_media(ev.message, folder)
                key = record_key(ev.topic, msg)
                producer.send(
                    ev.topic,
                    key=key.encode() if key else None,
                    value=json.dumps(msg, separators=(",", ":")).encode(),
                )
                sent[0] = i + 1
                bar.advance(task)
            producer.flush()
    finally:
        producer.close()
    with console.status("finishing the chaos schedule"):
        chaos.join(1800)


def _threshold(frac: float, total: int) -> int:
    """How many events are sent before an action at ``frac`` of the replay."""
    return max(1, math.ceil(frac * total))


def _chaos(
    procs: dict[str, Proc],
    extra: dict[str, Proc],
    report: ChaosReport,
    sent: list[int],
    allowed: list[int],
    total: int,
    live: KafkaSettings,
) -> None:
    t0 = time.monotonic()
    rebalance_s = 2 * live.session_timeout_ms / 1000
    schedule = _schedule()
    try:
        for k, (frac, action, name) in enumerate(schedule):
            while sent[0] < _threshold(frac, total):
                time.sleep(0.1)
            _act(procs, extra, report, action, name, rebalance_s, t0)
            nxt = schedule[k + 1][0] if k + 1 < len(schedule) else None
            allowed[0] = total if nxt is None else _threshold(nxt, total)
    finally:
        allowed[0] = total  # never leave the replay waiting for an action that failed


def _act(
    procs: dict[str, Proc],
    extra: dict[str, Proc],
    report: ChaosReport,
    action: str,
    name: str,
    rebalance_s: float,
    t0: float,
) -> None:
    """One action of the schedule (see :func:`_schedule`)."""
    p = procs.get(name) or extra[name]
    if action in ("kill", "crash", "leave"):
        # Crash or leave a member that is really in the group, not one still loading.
        _wait_serving([p], 900)
    peer = procs[p.service]
    if action == "leave" and peer is not p and peer.alive() and not peer.serving():
        # A restarted peer is loading its models: leave during the rebalance its
        # JoinGroup starts (the broker holds a JoinGroup about session_timeout/2).
        _wait_serving([peer], 900)
        time.sleep(1.0)
    stamp = f"{time.monotonic() - t0:6.1f}s"
    if action == "kill":
        p.kill()
        p.start()  # loads its models again; the group rebalances meanwhile
        report.actions.append(f"{stamp} SIGKILL {p.name} (serving), restarted")
    elif action == "crash":
        p.kill()
        # Evicted after the session timeout; the survivors rejoin and one of them leads.
        time.sleep(rebalance_s)
        p.start()
        report.actions.append(
            f"{stamp} SIGKILL {p.name} (serving), restarted after {rebalance_s:.0f}s"
        )
    elif action == "join":
        p.start()
        report.actions.append(f"{stamp} {p.name} joins")
        # Scale-out is complete once it serves and holds partitions.
        _wait_serving([p], 900)
        time.sleep(rebalance_s)
    else:
        code = p.stop()
        report.actions.append(f"{stamp} {p.name} leaves (SIGTERM, exit {code})")


def _settle(
    live: KafkaSettings,
    collector: Collector,
    truth: dict[str, Any],
    report: ChaosReport,
    timeout: float,
    stall_s: float = STALL_S,
    quiet_s: float = 10.0,
) -> tuple[Collector, bool]:
    """Wait until every input is an embedding or a dead letter and every truth incident has an
    alert, then for the alerts to stay quiet a few seconds (pending timers, last versions)."""
    deadline = time.monotonic() + timeout
    with console.status("waiting for every input to be accounted for") as status:
        last, quiet_since = (-1, -1), time.monotonic()
        while time.monotonic() < deadline:
            if not collector.thread.is_alive():
                # A reader thread that died on a broker error would look like a stall: read again.
                collector.close()
                collector = Collector(live, topics.EMBEDDINGS, topics.ALERTS, topics.DLQ).start()
                time.sleep(5)
            done = _account(collector, truth, report)
            seen = (len(collector.snapshot(topics.ALERTS)), report.embeddings + report.dead_letters)
            if seen != last:
                last, quiet_since = seen, time.monotonic()
            elif time.monotonic() - quiet_since > stall_s:
                return collector, False  # nothing moves any more: report what is missing
            status.update(
                f"accounted {report.embeddings + report.dead_letters}/{report.inputs} inputs, "
                f"{report.alerts} alerts; waiting"
            )
            if done and time.monotonic() - quiet_since > quiet_s:
                return collector, True
            time.sleep(1.0)
    return collector, False


def _account(collector: Collector, truth: dict[str, Any], report: ChaosReport) -> bool:
    """Fill ``report`` from what the topics hold now; True when nothing is missing."""
    embedded = set()
    for r in collector.snapshot(topics.EMBEDDINGS):
        eid = json.loads(r.value).get("event_id")
        if eid in truth:
            embedded.add(eid)
    dead = set()
    for r in collector.snapshot(topics.DLQ):
        try:
            eid = json.loads(base64.b64decode(json.loads(r.value)["payload_b64"]))["event_id"]
        except (ValueError, KeyError, TypeError):
            continue
        if eid in truth:
            dead.add(eid)
    alerts: list[Alert] = []
    content: dict[tuple[str, int], str] = {}
    dup, conflicts = 0, []
    for r in collector.snapshot(topics.ALERTS):
        raw = json.loads(r.value)
        a = Alert.model_validate(raw)
        if not any(e in truth for e in a.evidence):
            continue
        alerts.append(a)
        body = json.dumps({k: v for k, v in raw.items() if k not in _VOLATILE}, sort_keys=True)
        key = (a.alert_id, a.version)
        if key not in content:
            content[key] = body
        elif content[key] != body:
            conflicts.append(f"{a.alert_id} v{a.version}")
        else:
            dup += 1
    holder = alerts_by_event(alerts)
    per_incident: dict[str, set[str]] = {}
    for eid, ev in truth.items():
        inc = str((ev.truth or {}).get("incident_id"))
        if eid in holder:
            per_incident.setdefault(inc, set()).add(holder[eid])
        else:
            per_incident.setdefault(inc, set())
    report.embeddings = len(embedded)
    report.dead_letters = len(dead - embedded)
    report.missing = sorted(set(truth) - embedded - dead)
    report.alerts = len({holder[e] for e in holder})
    report.alert_versions = len(alerts)
    report.superseded = len({s for a in alerts for s in a.supersedes or []})
    # An incident made only of broken inputs has nothing to alert on.
    alertable = {
        str((ev.truth or {}).get("incident_id")) for eid, ev in truth.items() if eid in embedded
    }
    report.incidents_without_alert = sorted(
        i for i, a in per_incident.items() if not a and i in alertable
    )
    report.incidents_split = sorted(i for i, a in per_incident.items() if len(a) > 1)
    report.duplicate_versions = dup
    report.conflicting_versions = conflicts
    return not report.missing and not report.incidents_without_alert


def summary_table(report: ChaosReport) -> Table:
    """The readable summary of a chaos run."""
    t = Table(
        title=f"chaos run: {report.seconds:.0f}s" + (" (timed out)" if report.timed_out else "")
    )
    t.add_column("what")
    t.add_column("count", justify="right")
    t.add_column("expected")
    rows = [
        ("inputs replayed", report.inputs, ""),
        ("embedded", report.embeddings, ""),
        ("dead letters", report.dead_letters, ""),
        ("inputs unaccounted for", len(report.missing), "0"),
        ("truth incidents", report.truth_incidents, ""),
        ("alerts (alert ids)", report.alerts, ""),
        ("alert versions", report.alert_versions, ""),
        ("alerts superseded by a merge", report.superseded, ""),
        ("incidents without an alert", len(report.incidents_without_alert), "0"),
        ("incidents with > 1 alert id", len(report.incidents_split), "0"),
        ("(alert_id, version) repeated, same content", report.duplicate_versions, ""),
        ("(alert_id, version) repeated, different content", len(report.conflicting_versions), "0"),
    ]
    for what, n, want in rows:
        style = "red" if want and str(n) != want else ""
        t.add_row(what, f"[{style}]{n}[/]" if style else str(n), want)
    return t


def print_report(report: ChaosReport) -> None:
    """Actions taken, then the summary table."""
    for a in report.actions:
        console.print(f"  {a}")
    console.print(summary_table(report))
    if report.workdir:
        console.print(f"process logs and group offsets: {report.workdir}/logs")
    verdict = (
        "[green]all inputs accounted for, one alert per incident" if report.ok else "[red]FAILED"
    )
    console.print(verdict)
