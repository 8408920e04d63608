"""Wiring for `run` and `replay`: settings + bundle + source -> Detector with its sinks."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np

from edge.bundle import Bundle
from edge.daemon import Detector, JsonLinesSink, MqttSink, Sink
from edge.settings import Settings
from edge.topics import Topics

log = logging.getLogger(__name__)

FIRST_CONNECT_WAIT_S = 5.0
"""How long to wait for the broker before processing audio (events queue after that)."""


def run_detector(
    settings: Settings,
    bundle: Bundle,
    source: Iterable[np.ndarray],
    print_events: bool = True,
    on_stop: Callable[[], None] | None = None,
) -> Detector:
    """Run the detector over `source` until it ends or SIGTERM/SIGINT; publish if configured."""
    from edge.cli import install_stop_handlers

    sinks: list[Sink] = [JsonLinesSink()] if print_events else []
    publisher = None
    if settings.mqtt.host:
        from edge.publish import MqttPublisher

        topics = Topics(settings.mqtt.prefix, settings.device_id)
        publisher = MqttPublisher(
            settings.mqtt, topics, client_id=f"soundsentry-{settings.device_id}"
        )
        if not publisher.start(wait_s=FIRST_CONNECT_WAIT_S):
            log.warning("MQTT: broker not reachable yet; events are queued until it is")
        sinks.append(MqttSink(publisher))
    detector = Detector(settings, bundle, sinks)

    def stop() -> None:
        detector.stop()
        if on_stop:
            on_stop()

    install_stop_handlers(stop)
    try:
        detector.run(source)
    finally:
        if publisher is not None:
            publisher.close()
    return detector
