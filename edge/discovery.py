"""Home Assistant MQTT discovery: one device per detector, with an anomaly binary sensor and
sensors for the score and the input level; availability follows the daemon's last will."""

from __future__ import annotations

from typing import Any

from edge import __version__
from edge.topics import Topics


def discovery_configs(topics: Topics, model_id: str) -> dict[str, dict[str, Any]]:
    """Config topic -> payload for every entity of this device."""
    uid = f"{topics.prefix}_{topics.device_id}"
    device = {
        "identifiers": [uid],
        "name": f"SoundSentry {topics.device_id}",
        "manufacturer": "SoundSentry",
        "model": model_id,
        "sw_version": __version__,
    }
    common = {
        "availability_topic": topics.availability,
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": device,
        "state_topic": topics.state,
    }
    return {
        topics.ha_config("binary_sensor", "anomaly"): {
            **common,
            "name": "Anomaly",
            "unique_id": f"{uid}_anomaly",
            "device_class": "problem",
            "value_template": "{{ 'ON' if value_json.state == 'anomaly' else 'OFF' }}",
            "json_attributes_topic": topics.state,
        },
        topics.ha_config("sensor", "score"): {
            **common,
            "name": "Anomaly score",
            "unique_id": f"{uid}_score",
            "state_class": "measurement",
            "value_template": "{{ value_json.score | default(none) }}",
            "icon": "mdi:waveform",
        },
        topics.ha_config("sensor", "machine"): {
            **common,
            "name": "Machine",
            "unique_id": f"{uid}_machine",
            "value_template": "{{ value_json.machine | default('running') }}",
            "icon": "mdi:engine",
        },
        topics.ha_config("sensor", "running_hours"): {
            **common,
            "state_topic": topics.metrics,
            "name": "Running hours",
            "unique_id": f"{uid}_running_hours",
            "state_class": "total_increasing",
            "unit_of_measurement": "h",
            "value_template": "{{ value_json.running_hours }}",
            "icon": "mdi:timer-outline",
        },
        topics.ha_config("sensor", "level"): {
            **common,
            "name": "Input level",
            "unique_id": f"{uid}_level",
            "state_class": "measurement",
            "unit_of_measurement": "dBFS",
            "value_template": "{{ value_json.level_dbfs | default(none) }}",
            "icon": "mdi:microphone",
        },
    }
