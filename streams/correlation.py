"""The correlation key: which events belong to one incident (DESIGN.md "Data flow")."""

from __future__ import annotations

import hashlib
import math

from streams.schemas import InputEvent, Location, parse_ts
from streams.settings import defaults

CELL_M = defaults().correlation.cell_m
WINDOW_S = defaults().correlation.window_s
_M_PER_DEG_LAT = 111_320.0


def geo_cell(loc: Location, cell_m: float = CELL_M) -> tuple[int, int]:
    """Integer cell of about ``cell_m`` metres a side (longitude step widened by 1/cos(lat))."""
    step_lat = cell_m / _M_PER_DEG_LAT
    row = math.floor(loc.lat / step_lat)
    centre_lat = (row + 0.5) * step_lat
    step_lon = step_lat / max(math.cos(math.radians(centre_lat)), 1e-6)
    return row, math.floor(loc.lon / step_lon)


def correlation_key(event: InputEvent, cell_m: float = CELL_M, window_s: int = WINDOW_S) -> str:
    """``inc:<incident_id>``; else ``geo:<row>:<col>:<window>``; else ``area:<area>:<window>``;
    else ``evt:<event_id>`` (an event with no place stands alone)."""
    if event.incident_id:
        return f"inc:{event.incident_id}"
    window = int(parse_ts(event.ts).timestamp() // window_s)
    if event.location is not None:
        row, col = geo_cell(event.location, cell_m)
        return f"geo:{row}:{col}:{window}"
    if event.area:
        return f"area:{event.area.strip().lower()}:{window}"
    return f"evt:{event.event_id}"


def alert_id(key: str, first_event_id: str) -> str:
    """Deterministic alert id from the correlation key and the incident's first event."""
    return "alrt-" + hashlib.sha256(f"{key}|{first_event_id}".encode()).hexdigest()[:16]


def incident_of(key: str, incident_id: str | None) -> str:
    """What an alert reports as ``incident_id``: the producer's id, else the correlation key."""
    return incident_id or key
