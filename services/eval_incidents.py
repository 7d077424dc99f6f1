"""Scoring real incidents: which alert each event ended in, against the truth incident it came from.

Offline, events are correlated by the fusion service's own :class:`Correlator` in recording
order; through Kafka, by the evidence of the alerts that came back. Either way the result says
how many truth incidents were split over several alerts and how many alerts merged several truth
incidents, and scores each truth incident by the label of the alert holding most of its events.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any, Protocol

from streams.correlation import Correlator, Sighting, incident_alert_id
from streams.schemas import Alert


class ScoredRow(Protocol):
    """What incident scoring reads of an evaluation row."""

    event_id: str
    truth: str | None
    truth_incident: str | None
    key: str | None


def correlate_offline(sightings: Iterable[Sighting]) -> dict[str, str]:
    """event_id -> alert id, correlating in the given order exactly as fusion does."""
    corr = Correlator()
    members: dict[str, list[str]] = {}
    for s in sightings:
        cid, merged = corr.assign(s)
        group = members.setdefault(cid, [])
        for m in merged:
            group.extend(members.pop(m, []))
        group.append(s.event_id)
    return {
        eid: incident_alert_id(corr.clusters[cid].anchor[1])
        for cid, eids in members.items()
        for eid in eids
    }


def alerts_by_event(alerts: Iterable[Alert]) -> dict[str, str]:
    """event_id -> the alert that holds it, from every version seen (evidence lists are capped,
    so older versions name events the newest no longer lists); merged alerts resolve to the
    alert that superseded them."""
    owner: dict[str, tuple[int, str]] = {}
    superseded_by: dict[str, str] = {}
    for a in alerts:
        for s in a.supersedes or []:
            superseded_by[s] = a.alert_id
        for eid in a.evidence:
            if eid not in owner or a.version > owner[eid][0]:
                owner[eid] = (a.version, a.alert_id)

    def final(aid: str) -> str:
        seen = set()
        while aid in superseded_by and aid not in seen:
            seen.add(aid)
            aid = superseded_by[aid]
        return aid

    return {eid: final(aid) for eid, (_, aid) in owner.items()}


def incident_metrics(rows: Iterable[ScoredRow], alert_label: dict[str, str]) -> dict[str, Any]:
    """``truth_n``, ``split``, ``merged`` (counts and rates) and accuracy per truth incident.

    Only events that reached an alert count (dead letters have no alert)."""
    per_truth: dict[str, Counter[str]] = {}
    truth_label: dict[str, Counter[str]] = {}
    per_alert: dict[str, set[str]] = {}
    for r in rows:
        if r.truth_incident is None or r.key is None:
            continue
        per_truth.setdefault(r.truth_incident, Counter())[r.key] += 1
        if r.truth:
            truth_label.setdefault(r.truth_incident, Counter())[r.truth] += 1
        per_alert.setdefault(r.key, set()).add(r.truth_incident)
    split = sorted(t for t, alerts in per_truth.items() if len(alerts) > 1)
    merged = sorted(a for a, truths in per_alert.items() if len(truths) > 1)
    hits = []
    for t, alerts in per_truth.items():
        if t in truth_label:
            main = alerts.most_common(1)[0][0]
            hits.append(alert_label.get(main) == truth_label[t].most_common(1)[0][0])
    n, n_alerts = len(per_truth), len(per_alert)
    return {
        "truth_n": n,
        "alerts_n": n_alerts,
        "split": len(split),
        "split_rate": len(split) / n if n else 0.0,
        "merged": len(merged),
        "merged_rate": len(merged) / n_alerts if n_alerts else 0.0,
        "truth_accuracy": sum(hits) / len(hits) if hits else 0.0,
        "split_examples": split[:5],
    }
