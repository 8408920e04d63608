"""Home Assistant MQTT discovery: one device per detector with an entity for everything a
user watches or acts on.

Watched: the anomaly (a `problem` binary sensor that reads `unknown`, not OFF, while the
audio is faulty), the microphone's health (a `problem` binary sensor), the score and input
level (both `unknown` during a fault instead of a stale value), the detector's status, the
machine's state, the trend (`anomaly_index` from the metrics), running hours and the last
event with its attributes (bands, clip, clip URL). Acted on: a mute switch, the threshold as
a number and a button that marks the last event normal. Availability follows the daemon's
last will; every payload carries `origin` and, where it applies, an `entity_category`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, get_args, get_type_hints

from edge import __version__
from edge.bundle import Bundle
from edge.commands import threshold_bounds, threshold_step
from edge.messages import StateMessage
from edge.sink import Sink
from edge.topics import Topics

log = logging.getLogger(__name__)

ORIGIN = {
    "name": "SoundSentry",
    "sw_version": __version__,
    "support_url": "https://github.com/soundsentry/soundsentry",
}
"""Who publishes the discovery payloads (Home Assistant logs it)."""
HA_MUTE_MINUTES = 60
"""How long the mute switch silences the detector when turned on."""
FAULT = "fault"
"""The state message's `state` while the audio is faulty."""
STATES = list(get_args(get_type_hints(StateMessage)["state"]))
"""Every `state` a state message can carry: the options of the Status enum."""

# Jinja templates Home Assistant renders on each payload. Rendering `None` makes a binary
# sensor or a sensor `unknown` (Home Assistant's MQTT docs), which is what a faulty
# microphone means: nothing is known about the machine.
NOT_JUDGING = ("fault", "learning", "muted", "starting", "stopped")
"""States in which the detector says nothing about the machine: a faulty microphone, the
commissioning period still learning what normal sounds like, a mute (a week of "no problem"
while nothing listened), the first seconds before a window is heard, a daemon stopped (its
`off` was the "fault cleared" of automations at every restart, in a review)."""
ANOMALY_TEMPLATE = (
    f"{{% if value_json.state in {NOT_JUDGING!r} %}}None"
    "{% elif value_json.state == 'anomaly' %}ON{% else %}OFF{% endif %}"
)
STABLE_ATTRIBUTES = ("event_id", "machine", "label", "muted_until", "model", "threshold")
"""State fields the Anomaly sensor keeps as attributes: not the score, level or time, which
change at every state message, so Home Assistant's recorder does not write a row for each."""
ANOMALY_ATTRIBUTES_TEMPLATE = (
    "{{ {" + ", ".join(f"'{k}': value_json.get('{k}')" for k in STABLE_ATTRIBUTES) + "} | tojson }}"
)
HEALTH_TEMPLATE = "{{ 'ON' if value_json.status == 'fault' else 'OFF' }}"
MUTED_TEMPLATE = "{{ 'ON' if value_json.muted_until is defined else 'OFF' }}"


def _unless_fault(field: str) -> str:
    """A template giving `field` of the state, or None (unknown) while the audio is faulty."""
    return (
        f"{{% if value_json.state == '{FAULT}' or value_json.{field} is not defined %}}None"
        f"{{% else %}}{{{{ value_json.{field} }}}}{{% endif %}}"
    )


def _command(payload: dict[str, Any]) -> str:
    """A command payload for the `set` topic, compact JSON."""
    return json.dumps(payload, separators=(",", ":"))


def discovery_configs(
    topics: Topics,
    model_id: str,
    threshold: float | None = None,
    configuration_url: str | None = None,
    in_force: float | None = None,
    classifier: bool = False,
    learns: bool = True,
) -> dict[str, dict[str, Any]]:
    """Config topic -> payload for every entity of this device. Without the calibrated
    `threshold` the threshold number is left out (its bounds derive from it, widened to the
    threshold `in_force` when that lies outside, at most CLASSIFIER_MAX for a `classifier`);
    with the dashboard's `configuration_url` Home Assistant links the device to its page.
    A model that cannot `learns` a mark (`learns_on_site`, `Detector.marks_learnt`) has no
    button to mark an event normal: pressed, it was refused on the response topic, which Home
    Assistant does not show, so nothing happened (a review)."""
    uid = f"{topics.prefix}_{topics.device_id}"
    common: dict[str, Any] = {
        "availability_topic": topics.availability,
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": {
            "identifiers": [uid],
            "name": f"SoundSentry {topics.device_id}",
            "manufacturer": "SoundSentry",
            "model": model_id,
            "sw_version": __version__,
        },
        "origin": ORIGIN,
    }
    if configuration_url:
        common["device"]["configuration_url"] = configuration_url
    entities = {
        **_watched(topics, classifier),
        **(_recognised(topics) if classifier else {}),
        **_diagnostics(topics),
        **_controls(topics, threshold, in_force, classifier),
    }
    if not learns:
        del entities[("button", "mark_normal")]
    return {
        topics.ha_config(component, object_id): {
            **common,
            "unique_id": f"{uid}_{object_id}",
            **config,
        }
        for (component, object_id), config in entities.items()
    }


def announced(
    topics: Topics, model_id: str, *args: Any, **kwargs: Any
) -> dict[str, dict[str, Any] | None]:
    """What the device announces (`discovery_configs`) and None, to clear it, for each entity it
    may have announced before but does not now: a classifier's `Recognised class` stayed in
    Home Assistant, retained, after a reload or restart with an anomaly model."""
    return {
        **dict.fromkeys(config_topics(topics)),
        **discovery_configs(topics, model_id, *args, **kwargs),
    }


def learns_on_site(bundle: Bundle) -> bool:
    """Whether the model can learn an event marked normal (edge.learning.FEATURIZERS)."""
    from edge.learning import FEATURIZERS

    return bundle.manifest.kind in FEATURIZERS


def config_topics(topics: Topics) -> list[str]:
    """Every config topic this device announces when discovery is on (the threshold's too),
    and those an older release announced it under (`Topics.ha_node_before`), to clear."""
    every = (discovery_configs(topics, "", threshold=0.5, classifier=c) for c in (False, True))
    now = list(dict.fromkeys(topic for configs in every for topic in configs))
    before = topics.ha_node_before
    if before is None:
        return now
    # the old node's cleared first: both carry one unique_id, and Home Assistant ignores a
    # config whose unique_id another topic holds, then the clear removed the entity (a review)
    return [*(t.replace(f"/{topics.ha_node}/", f"/{before}/", 1) for t in now), *now]


def _recognised(topics: Topics) -> dict[tuple[str, str], dict[str, Any]]:
    """A classifier's: the class it recognises now (the Anomaly sensor alone would not say which
    fault, and without a class named `normal` it says none)."""
    return {
        ("sensor", "class"): {
            "name": "Recognised class",
            "state_topic": topics.state,
            "value_template": "{{ value_json.label | default(None) }}",
            "icon": "mdi:label-outline",
        }
    }


def _watched(topics: Topics, classifier: bool = False) -> dict[tuple[str, str], dict[str, Any]]:
    """What a user watches: anomaly, score, status, machine, trend, last event. A classifier's
    score is the probability of the class it names, `normal` too, and its trend of those says
    nothing: read as an anomaly score, 0.996 above a threshold of 0.5 looked like an alarm
    during normal running (a review). Its score is called what it is, and it has no trend."""
    entities = {
        ("binary_sensor", "anomaly"): {
            "name": "Anomaly",
            "state_topic": topics.state,
            "device_class": "problem",
            "value_template": ANOMALY_TEMPLATE,
            "json_attributes_topic": topics.state,
            "json_attributes_template": ANOMALY_ATTRIBUTES_TEMPLATE,
        },
        ("sensor", "score"): {
            "name": "Anomaly score",
            "state_topic": topics.state,
            "state_class": "measurement",
            "value_template": _unless_fault("score"),
            "icon": "mdi:waveform",
        },
        ("sensor", "status"): {
            "name": "Status",
            "state_topic": topics.state,
            "device_class": "enum",
            "options": STATES,
            "value_template": "{{ value_json.state }}",
            "icon": "mdi:ear-hearing",
        },
        ("sensor", "machine"): {  # running, off, or the name of a trained operating state
            "name": "Machine",
            "state_topic": topics.state,
            "value_template": _unless_fault("machine"),
            "icon": "mdi:engine",
        },
        ("sensor", "trend"): {
            "name": "Anomaly trend",
            "state_topic": topics.metrics,
            "state_class": "measurement",
            "value_template": "{{ value_json.anomaly_index | default(None) }}",
            "icon": "mdi:chart-line",
        },
        ("sensor", "last_event"): {
            "name": "Last event",
            "state_topic": topics.last_event,
            "device_class": "timestamp",
            "value_template": "{{ value_json.started_at }}",
            "json_attributes_topic": topics.last_event,
            "icon": "mdi:alert-octagram-outline",
        },
    }
    if classifier:
        entities[("sensor", "score")]["name"] = "Class probability"
        del entities[("sensor", "trend")]
    return entities


def _diagnostics(topics: Topics) -> dict[tuple[str, str], dict[str, Any]]:
    """What an installer watches: the microphone, the input level, running hours."""
    return {
        ("binary_sensor", "audio"): {
            "name": "Microphone problem",
            "state_topic": topics.health,
            "device_class": "problem",
            "value_template": HEALTH_TEMPLATE,
            "json_attributes_topic": topics.health,
            "entity_category": "diagnostic",
            "icon": "mdi:microphone-off",
        },
        ("sensor", "level"): {
            "name": "Input level",
            "state_topic": topics.state,
            "state_class": "measurement",
            "unit_of_measurement": "dBFS",
            "value_template": _unless_fault("level_dbfs"),
            "entity_category": "diagnostic",
            "icon": "mdi:microphone",
        },
        ("sensor", "running_hours"): {
            "name": "Running hours",
            "state_topic": topics.metrics,
            # not total_increasing: the hours are saved every 10 min (daemon.RUNNING_SAVE_S), so
            # after a power cut they restart a little lower, which Home Assistant would take for
            # a meter reset (and count the whole total again); `total` counts a drop as a drop
            "state_class": "total",
            "device_class": "duration",
            "unit_of_measurement": "h",
            "value_template": "{{ value_json.running_hours }}",
            "entity_category": "diagnostic",
            "icon": "mdi:timer-outline",
        },
    }


COMMAND_QOS = 1
"""The QoS Home Assistant's controls publish their commands at: `set`'s (its default is 0, so a
press or a mute sent across a reconnect was lost)."""


def _controls(
    topics: Topics, threshold: float | None, in_force: float | None = None, classifier: bool = False
) -> dict[tuple[str, str], dict[str, Any]]:
    """What a user acts on: mute, mark the last event normal, the threshold."""
    controls: dict[tuple[str, str], dict[str, Any]] = {
        ("switch", "mute"): {
            "name": "Mute",
            "command_topic": topics.command,
            "qos": COMMAND_QOS,
            "payload_on": _command({"command": "mute", "minutes": HA_MUTE_MINUTES}),
            "payload_off": _command({"command": "unmute"}),
            "state_topic": topics.state,
            "value_template": MUTED_TEMPLATE,
            "state_on": "ON",
            "state_off": "OFF",
            "icon": "mdi:volume-off",
        },
        ("button", "mark_normal"): {
            "name": "Mark last event normal",
            "command_topic": topics.command,
            "qos": COMMAND_QOS,
            "payload_press": _command({"command": "mark_normal", "event_id": "last"}),
            "icon": "mdi:check-circle-outline",
        },
    }
    if threshold is not None:
        low, high, step = threshold_range(threshold, in_force, classifier)
        controls[("number", "threshold")] = {
            "name": "Threshold",
            "command_topic": topics.command,
            "qos": COMMAND_QOS,
            "command_template": '{"command":"set_threshold","value":{{ value }}}',
            "state_topic": topics.state,
            "value_template": "{{ value_json.threshold }}",
            "min": low,
            "max": high,
            "step": step,
            "mode": "box",
            "entity_category": "config",
            "icon": "mdi:tune-vertical",
        }
    return controls


def threshold_range(
    calibrated: float, in_force: float | None = None, classifier: bool = False
) -> tuple[float, float, float]:
    """(min, max, step) of the threshold number: the bounds set_threshold accepts, widened to
    the threshold in force (a `[detector] threshold` override may lie outside, and
    set_threshold accepts the widened range) on the step grid, so Home Assistant can show every
    threshold the device runs and offers none it refuses."""
    low, high = threshold_bounds(calibrated, classifier, in_force)  # on the step grid
    return low, high, threshold_step(calibrated)


class DiscoveryRefresh(Sink):
    """Re-announces discovery when the running model changes (reload_model, SIGHUP, a model
    learned on site): the device's model and the threshold's bounds follow the bundle; and
    when the threshold in force lies outside the announced bounds (a `[detector] threshold`
    override), which are then widened to it."""

    def __init__(
        self,
        publisher: Any,
        model_id: str,
        bundle_of: Callable[[], Bundle],
        configuration_url: str | None = None,
    ) -> None:
        self.publisher = publisher
        self.model_id = model_id
        self.bundle_of = bundle_of
        self.configuration_url = configuration_url
        self.threshold: float | None = None  # in force, as the last state said
        self.learns_of: Callable[[], bool] | None = None
        """Whether a mark can be learnt now (`Detector.marks_learnt`, set once the daemon is
        built); until then, by the model's kind (`learns_on_site`)."""

    def learns_from(self, learns_of: Callable[[], bool]) -> None:
        """Announce the mark button as the daemon can learn a mark: not on the demo's bundle
        before a learning period (it refused every mark), then with the version that learnt
        (a new model is announced anew, `state`)."""
        self.learns_of = learns_of
        self._announce()

    def state(self, message: StateMessage) -> None:
        """Compare the state's model and threshold with the announced ones; re-announce on a
        new model or a threshold outside the bounds."""
        self.threshold = message.threshold
        if message.model == self.model_id and self._covers(message.threshold):
            return
        bundle = self.bundle_of()
        if message.model != self.model_id:
            log.info("discovery: model now %s; re-announcing to Home Assistant", bundle.model_id)
        else:
            log.info("discovery: threshold %g outside the announced bounds", message.threshold)
        self.model_id = message.model
        self._announce()

    def link(self, page: str) -> None:
        """The dashboard got its port after the start (another held it): the device links its
        page now (on the loop's thread)."""
        if page == self.configuration_url:
            return
        self.configuration_url = page
        log.info("discovery: linking the device to its page %s/", page)
        self._announce()

    def _announce(self) -> None:
        bundle = self.bundle_of()
        self.publisher.set_discovery(
            announced(
                self.publisher.topics,
                bundle.model_id,
                bundle.threshold,
                self.configuration_url,
                self.threshold,
                bundle.manifest.kind == "classifier",
                learns=self.learns_of() if self.learns_of is not None else learns_on_site(bundle),
            )
        )

    def _covers(self, threshold: float) -> bool:
        """Whether the announced threshold number (if any) can show `threshold`."""
        topic = self.publisher.topics.ha_config("number", "threshold")
        number = self.publisher.discovery.get(topic)
        return number is None or number["min"] <= threshold <= number["max"]
