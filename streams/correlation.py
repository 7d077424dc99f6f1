"""Correlation: which events belong to one incident (DESIGN.md "Correlation", docs/correlation.md).

Two levels:

* **Routing** (:func:`routing_keys`): the Kafka key of ``city.embeddings`` is a coarse tile of
  ``route_m`` metres, so that neighbours reach the same fusion instance. An event within
  ``border_m`` of a tile edge is routed to the neighbouring tile(s) too: every tile touched by an
  incident no wider than ``border_m`` then receives *all* of its events, and exactly one fusion
  instance (the one holding the partition of the anchor event's home tile, :func:`owner_key`)
  speaks for it.
* **Joining** (:class:`Correlator`): inside fusion, an event joins an open incident when it lies
  within ``radius_m`` of one of the incident's located events and within ``window_s`` (event
  time) of the incident's span, or shares its ``incident_id``, or (no location) its area. An event
  that matches several open incidents merges them; the earlier one survives.

The same :class:`Correlator` runs in the fusion service and in offline ``evaluate``.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from dataclasses import dataclass, field
from typing import TypeVar

from streams.schemas import InputEvent, Location, parse_ts
from streams.settings import defaults

_CONF = defaults().correlation
RADIUS_M = _CONF.radius_m
WINDOW_S = _CONF.window_s
ROUTE_M = _CONF.route_m
BORDER_M = _CONF.border_m
_M_PER_DEG_LAT = 111_320.0
K = TypeVar("K")


def geo_cell(loc: Location, cell_m: float = ROUTE_M) -> tuple[int, int]:
    """Integer cell of about ``cell_m`` metres a side (longitude step widened by 1/cos(lat))."""
    return _cell(loc.lat, loc.lon, cell_m)


def _cell(lat: float, lon: float, cell_m: float) -> tuple[int, int]:
    step_lat = cell_m / _M_PER_DEG_LAT
    row = math.floor(lat / step_lat)
    centre_lat = (row + 0.5) * step_lat
    step_lon = step_lat / max(math.cos(math.radians(centre_lat)), 1e-6)
    return row, math.floor(lon / step_lon)


def _near_tiles(lat: float, lon: float, route_m: float, border_m: float) -> list[tuple[int, int]]:
    """The home tile, then every tile with a point within ``border_m`` of (lat, lon): per tile
    row, the disc's chord at that row's distance gives the columns it reaches. (Probing 16
    directions missed a tile whose corner was 505 m away with a 600 m border.)"""
    step_lat = route_m / _M_PER_DEG_LAT
    dlat = border_m / _M_PER_DEG_LAT
    m_per_deg_lon = _M_PER_DEG_LAT * max(math.cos(math.radians(lat)), 1e-6)
    tiles = [_cell(lat, lon, route_m)]
    for row in range(math.floor((lat - dlat) / step_lat), math.floor((lat + dlat) / step_lat) + 1):
        gap_m = max(row * step_lat - lat, 0.0, lat - (row + 1) * step_lat) * _M_PER_DEG_LAT
        if gap_m > border_m:
            continue
        reach = math.sqrt(border_m**2 - gap_m**2) / m_per_deg_lon
        centre = (row + 0.5) * step_lat
        step_lon = step_lat / max(math.cos(math.radians(centre)), 1e-6)
        spans = [(lon - reach, lon + reach)]
        if lon + reach >= 180.0:  # the disc crosses the antimeridian: the other side's tiles
            spans.append((-180.0, lon + reach - 360.0))
        if lon - reach < -180.0:
            spans.append((lon - reach + 360.0, 180.0))
        for west, east in spans:
            for col in range(math.floor(west / step_lon), math.floor(east / step_lon) + 1):
                if (row, col) not in tiles:
                    tiles.append((row, col))
    return tiles


def distance_m(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance in metres between two (lat, lon) points."""
    la1, lo1, la2, lo2 = map(math.radians, (a[0], a[1], b[0], b[1]))
    h = (
        math.sin((la2 - la1) / 2) ** 2
        + math.cos(la1) * math.cos(la2) * math.sin((lo2 - lo1) / 2) ** 2
    )
    return 2 * 6_371_000.0 * math.asin(min(1.0, math.sqrt(h)))


def routing_keys(
    event: InputEvent, route_m: float = ROUTE_M, border_m: float = BORDER_M
) -> list[str]:
    """The keys an event's embedding is produced under: its home key first, then the
    neighbouring tiles it lies within ``border_m`` of.

    ``geo:<row>:<col>`` (a ``route_m`` tile) when located; else ``area:<area>``; else
    ``inc:<incident_id>``; else ``evt:<event_id>`` (an event with no place stands alone)."""
    if event.location is not None:
        tiles = _near_tiles(event.location.lat, event.location.lon, route_m, border_m)
        return [f"geo:{r}:{c}" for r, c in tiles]
    if event.area and event.area.strip():
        return [f"area:{event.area.strip().lower()}"]
    if event.incident_id:
        return [f"inc:{event.incident_id}"]
    return [f"evt:{event.event_id}"]


def correlation_key(event: InputEvent) -> str:
    """The home routing key of an event (the first of :func:`routing_keys`)."""
    return routing_keys(event)[0]


def owner_key(
    location: Location | None, area: str | None, incident_id: str | None, event_id: str
) -> str:
    """Home routing key of an event from its fields (the anchor of an incident names its owner)."""
    if location is not None:
        row, col = geo_cell(location)
        return f"geo:{row}:{col}"
    if area and area.strip():
        return f"area:{area.strip().lower()}"
    if incident_id:
        return f"inc:{incident_id}"
    return f"evt:{event_id}"


def alert_id(key: str, first_event_id: str) -> str:
    """Deterministic alert id from a namespace and the incident's anchor event."""
    return "alrt-" + hashlib.sha256(f"{key}|{first_event_id}".encode()).hexdigest()[:16]


def incident_alert_id(anchor_event_id: str) -> str:
    """The alert id of an incident: a function of its anchor event only, so every fusion
    instance and every restart agree on it (whatever routing key delivered the event)."""
    return alert_id("incident", anchor_event_id)


# -- joining ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sighting:
    """What correlation needs of one event: when, where, and any producer incident id."""

    event_id: str
    ts: float  # event time, seconds since the epoch
    location: tuple[float, float] | None = None
    area: str | None = None
    incident_id: str | None = None

    @property
    def order(self) -> tuple[float, str]:
        """Event time, then id: the anchor of an incident is its smallest ``order``."""
        return (self.ts, self.event_id)


def sighting(
    event_id: str,
    ts: str,
    location: Location | None,
    area: str | None,
    incident_id: str | None,
) -> Sighting:
    """A :class:`Sighting` from schema fields (Embedding or input event alike)."""
    return Sighting(
        event_id,
        parse_ts(ts).timestamp(),
        (location.lat, location.lon) if location is not None else None,
        area.strip().lower() if area and area.strip() else None,
        incident_id or None,
    )


@dataclass
class Cluster:
    """An open incident as correlation sees it."""

    cid: str  # the first event that opened it (internal handle, not the alert id)
    anchor: tuple[float, str]  # smallest (event time, event id) seen
    first_ts: float
    last_ts: float
    points: deque[tuple[float, float]]
    incident_ids: set[str] = field(default_factory=set)
    areas: set[str] = field(default_factory=set)
    cells: set[tuple[int, int]] = field(default_factory=set)

    def span_ok(self, ts: float, window_s: float) -> bool:
        """Event time within ``window_s`` of the incident's span (a sliding window)."""
        return self.first_ts - window_s <= ts <= self.last_ts + window_s


class Correlator:
    """Open incidents and the rule that joins a new event to them (pure, no I/O).

    Located events are indexed on a grid of ``radius_m`` cells, so a lookup checks the 3 x 3
    neighbourhood only. Each incident keeps its last ``max_points`` locations."""

    def __init__(
        self, radius_m: float = RADIUS_M, window_s: float = WINDOW_S, max_points: int = 64
    ) -> None:
        self.radius_m = radius_m
        self.window_s = window_s
        self.max_points = max_points
        self.clusters: dict[str, Cluster] = {}
        self._grid: dict[tuple[int, int], set[str]] = {}
        self._by_incident: dict[str, set[str]] = {}
        self._by_area: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self.clusters)

    def candidates(self, s: Sighting) -> list[str]:
        """Open incidents ``s`` may join, earliest anchor first."""
        found: set[str] = set()
        if s.incident_id:
            found |= self._by_incident.get(s.incident_id, set())
        if s.location is not None:
            row, col = _cell(*s.location, self.radius_m)
            near: set[str] = set()
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    near |= self._grid.get((row + dr, col + dc), set())
            for cid in near:
                c = self.clusters[cid]
                if c.span_ok(s.ts, self.window_s) and any(
                    distance_m(s.location, p) <= self.radius_m for p in c.points
                ):
                    found.add(cid)
        elif s.area:
            found |= {
                cid
                for cid in self._by_area.get(s.area, set())
                if self.clusters[cid].span_ok(s.ts, self.window_s)
            }
        if s.incident_id:
            # A producer's incident id is authoritative: never join another producer incident.
            found = {
                cid
                for cid in found
                if not self.clusters[cid].incident_ids
                or s.incident_id in self.clusters[cid].incident_ids
            }
        return sorted(found, key=lambda cid: self.clusters[cid].anchor)

    def assign(self, s: Sighting) -> tuple[str, list[str]]:
        """Join ``s`` to an open incident (or open one). Returns the incident's handle and the
        handles of incidents merged into it (``s`` showed they are one)."""
        found = self.candidates(s)
        if not found:
            cid = s.event_id
            self.clusters[cid] = Cluster(cid, s.order, s.ts, s.ts, deque(maxlen=self.max_points))
            self._add(cid, s)
            return cid, []
        target, merged = found[0], []
        for other in found[1:]:
            ids = self.clusters[target].incident_ids | self.clusters[other].incident_ids
            if len(ids) <= 1:  # two different producer ids stay apart
                self.merge(target, other)
                merged.append(other)
        self._add(target, s)
        return target, merged

    def merge(self, into: str, other: str) -> None:
        """Fold incident ``other`` into ``into``."""
        o = self.remove(other)
        c = self.clusters[into]
        c.anchor = min(c.anchor, o.anchor)
        c.first_ts, c.last_ts = min(c.first_ts, o.first_ts), max(c.last_ts, o.last_ts)
        for p in o.points:
            self._point(into, p)
        for i in o.incident_ids:
            self._index(self._by_incident, i, into)
        for a in o.areas:
            self._index(self._by_area, a, into)
        c.incident_ids |= o.incident_ids
        c.areas |= o.areas

    def remove(self, cid: str) -> Cluster:
        """Forget an incident (expired, merged or revoked)."""
        c = self.clusters.pop(cid)
        for cell in c.cells:
            self._unindex(self._grid, cell, cid)
        for i in c.incident_ids:
            self._unindex(self._by_incident, i, cid)
        for a in c.areas:
            self._unindex(self._by_area, a, cid)
        return c

    def _add(self, cid: str, s: Sighting) -> None:
        c = self.clusters[cid]
        c.anchor = min(c.anchor, s.order)
        c.first_ts, c.last_ts = min(c.first_ts, s.ts), max(c.last_ts, s.ts)
        if s.location is not None:
            self._point(cid, s.location)
        if s.incident_id:
            c.incident_ids.add(s.incident_id)
            self._index(self._by_incident, s.incident_id, cid)
        if s.area:
            c.areas.add(s.area)
            self._index(self._by_area, s.area, cid)

    def _point(self, cid: str, p: tuple[float, float]) -> None:
        c = self.clusters[cid]
        # When the oldest point leaves the deque its grid cell stays indexed: a harmless extra
        # candidate, dropped with the incident.
        c.points.append(p)
        cell = _cell(*p, self.radius_m)
        c.cells.add(cell)
        self._index(self._grid, cell, cid)

    @staticmethod
    def _index(idx: dict[K, set[str]], k: K, cid: str) -> None:
        idx.setdefault(k, set()).add(cid)

    @staticmethod
    def _unindex(idx: dict[K, set[str]], k: K, cid: str) -> None:
        s = idx.get(k)
        if s is not None:
            s.discard(cid)
            if not s:
                del idx[k]


def incident_of(incident_ids: set[str], alert: str) -> str:
    """What an alert reports as ``incident_id``: the producer's id, else the alert id."""
    return min(incident_ids) if incident_ids else alert
