"""`/metrics` in the Prometheus text format, read from the live view at each scrape."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from edge.machine_state import OFF
from edge.web.live import LiveView

STATES = ("normal", "anomaly", "muted", "fault", "learning", "starting", "stopped")
"""Values of soundsentry_state (one series each, 1 for the current one)."""
# Metrics message fields exported as gauges: (field, metric name, help).
_FROM_METRICS = (
    (
        "realtime_factor",
        "realtime_factor",
        "Processing time per second of audio, over the last minute of audio.",
    ),
    ("inference_ms_p50", "inference_ms_p50", "Median per-window processing time, ms."),
    ("inference_ms_p95", "inference_ms_p95", "95th percentile per-window processing time, ms."),
    ("queue_depth", "capture_queue_depth", "Audio blocks waiting in the capture queue."),
    ("spool_depth", "spool_depth", "Messages waiting in the durable spool."),
    (
        "running_hours",
        "machine_running_hours",
        "Hours the machine has run in all (kept across restarts; the machine off not counted).",
    ),
    ("cpu_temp_c", "cpu_temperature_celsius", "SoC temperature."),
)
_COUNTERS = (
    ("dropped_blocks", "dropped_blocks", "Audio blocks dropped by the capture queue."),
    ("overflows", "capture_overflows", "Input overflows reported by the audio device."),
    ("spool_dropped", "spool_dropped", "Spooled messages dropped at the spool bound."),
    ("commands_shed", "commands_shed", "Commands shed by a full command queue."),
)


class LiveCollector(Collector):
    """Gauges and counters from the live view, labelled with the device; the model in use is
    `soundsentry_model_info`'s label."""

    def __init__(self, live: LiveView, device_id: str) -> None:
        self.live = live
        self.device_id = device_id

    def collect(self) -> Iterator[Any]:
        """Yield the metric families of one scrape."""
        live = self.live
        state, window, status = (
            live.last_state or {},
            live.last_window or {},
            live.last_status or {},
        )
        metrics, labels = live.last_metrics or {}, {"device_id": self.device_id}
        gauges = {
            "score": ("Anomaly score of the latest window.", window.get("score")),
            "threshold": ("Decision threshold in force.", state.get("threshold")),
            "level_dbfs": ("Input level of the latest window, dBFS.", window.get("level_dbfs")),
            "health_faults": (
                "Active audio faults.",
                len((live.last_health or {}).get("faults", [])),
            ),
            "learning_progress": (
                "Share of the learning period done.",
                (status.get("learning") or {}).get("progress"),
            ),
            "anomaly_index": (
                "Per-minute anomaly index (trend); absent after a minute without running audio.",
                status.get("anomaly_index"),
            ),
            "machine_running": (
                "1 while the machine runs, 0 while it is off (its windows' scores raise no event);"
                " absent while an audio fault says nothing of it.",
                None
                if not window or state.get("state") == "fault"
                else float(window.get("machine") != OFF),
            ),
            "dashboard_streams": ("Browsers connected to the live stream.", live.stream_count),
            "last_window_timestamp_seconds": (
                "When the latest window was scored (Unix time): score and level_dbfs are its.",
                live.last_window_time,
            ),
        }
        for name, (text, value) in gauges.items():
            yield _gauge(name, text, labels, value)
        yield self._states(state.get("state"))
        model = GaugeMetricFamily(
            "soundsentry_model_info",
            "1 for the model in use (a relearn, mark_normal or reload moves score and threshold).",
            labels=["device_id", "model"],
        )
        if state.get("model"):
            model.add_metric([self.device_id, str(state["model"])], 1.0)
        yield model
        yield _counter("windows_scored", "Windows scored.", labels, status.get("windows_scored"))
        yield _counter("events", "Anomalies started.", labels, live.events_started)
        for field, name, text in _FROM_METRICS:
            yield _gauge(name, text, labels, metrics.get(field))
        for field, name, text in _COUNTERS:
            yield _counter(name, text, labels, metrics.get(field))

    def _states(self, current: str | None) -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            "soundsentry_state", "1 for the current state.", labels=["device_id", "state"]
        )
        for name in STATES:
            family.add_metric([self.device_id, name], 1.0 if name == current else 0.0)
        return family


def _gauge(name: str, text: str, labels: dict[str, str], value: float | None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(f"soundsentry_{name}", text, labels=list(labels))
    if value is not None:
        family.add_metric(list(labels.values()), float(value))
    return family


def _counter(
    name: str, text: str, labels: dict[str, str], value: float | None
) -> CounterMetricFamily:
    family = CounterMetricFamily(f"soundsentry_{name}", text, labels=list(labels))
    if value is not None:
        family.add_metric(list(labels.values()), float(value))
    return family


def registry_for(live: LiveView, device_id: str) -> CollectorRegistry:
    """A registry with the live metrics and the process's own (CPU seconds, resident memory)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LiveCollector(live, device_id))
    ProcessCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in the Prometheus text format, and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
