"""Prometheus metrics of the services (exposed by ``cityfuse serve --metrics-port``)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RECORDS_IN = Counter("cityfuse_records_in_total", "Records consumed", ["service"])
RECORDS_OUT = Counter("cityfuse_records_out_total", "Records produced", ["service"])
DLQ = Counter("cityfuse_dlq_total", "Records sent to city.dlq", ["service", "stage", "reason"])
ALERTS = Counter("cityfuse_alerts_total", "Alert versions emitted", ["label"])
BATCH_SECONDS = Histogram("cityfuse_batch_seconds", "Time to process one micro-batch", ["service"])
ALERT_LATENCY = Histogram(
    "cityfuse_ingest_to_alert_seconds",
    "From the newest evidence's ingest to the alert",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
ERRORS = Counter(
    "cityfuse_service_errors_total",
    "Failed sends, commits refused by a rebalance, failed timers",
    ["service", "kind"],
)
