"""Metrics match scikit-learn's (the DCASE evaluation uses roc_auc_score with max_fpr); the
daemon's own metrics and its Prometheus exposition."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from train.metrics import partial_auc, roc_auc, spearman


@pytest.mark.parametrize("seed", range(5))
def test_auc_and_pauc_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    labels[:2] = [0, 1]
    scores = np.round(rng.normal(size=60) + labels, 1)  # rounding creates ties
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert partial_auc(labels, scores, 0.1) == pytest.approx(
        roc_auc_score(labels, scores, max_fpr=0.1), abs=1e-12
    )


def test_perfect_and_spearman() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert partial_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)


# --- the daemon's metrics and /metrics -----------------------------------------------------------


def test_the_realtime_factor_is_the_latest_minutes_not_the_runs_average() -> None:
    """An average since the start: after ten minutes at 1 % of real time, a minute at 50 %
    (a Pi throttling in the sun) showed as 5 %, and after days not at all."""
    from edge.metrics import Metrics

    m = Metrics()
    for _ in range(6000):  # ten minutes of 0.1-s blocks at 1 %
        m.block_processed(0.1, 0.001)
    assert m.realtime_factor == pytest.approx(0.01)
    for _ in range(600):  # one minute at 50 %
        m.block_processed(0.1, 0.05)
    assert m.realtime_factor == pytest.approx(0.5, rel=0.02)


def test_prometheus_names_the_model_and_when_the_last_window_came() -> None:
    """A relearn or reload changed score and threshold with no marker in the series, and a
    score that stopped coming (a stall, a fault) stayed flat at its last value."""
    from prometheus_client.parser import text_string_to_metric_families

    from edge.web.live import LiveView
    from edge.web.prometheus import exposition, registry_for

    live = LiveView()
    live.last_state = {"state": "normal", "model": "pump-3f2a-site-v2", "threshold": 2.5}
    live.last_window_time = 1_800_000_000.0
    text = exposition(registry_for(live, "pump"))[0].decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    (info,) = families["soundsentry_model_info"].samples
    assert info.labels == {"device_id": "pump", "model": "pump-3f2a-site-v2"} and info.value == 1
    (at,) = families["soundsentry_last_window_timestamp_seconds"].samples
    assert at.value == 1_800_000_000.0
    hours = families["soundsentry_machine_running_hours"]
    assert "kept across restarts" in hours.documentation


def test_prometheus_says_whether_the_machine_runs() -> None:
    """A machine switched off was invisible on /metrics: the score of its quiet windows kept
    coming and the state stayed `normal`, so a graph or an alert on score against threshold
    could not tell an off night from a running one."""
    from prometheus_client.parser import text_string_to_metric_families

    from edge.web.live import LiveView
    from edge.web.prometheus import exposition, registry_for

    live = LiveView()

    def running() -> list[float]:
        text = exposition(registry_for(live, "pump"))[0].decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        return [s.value for s in families["soundsentry_machine_running"].samples]

    assert running() == [], "no window heard yet: no value"
    live.last_window = {"score": 1.3, "machine": "off"}
    assert running() == [0.0]
    live.last_window = {"score": 0.9, "machine": "running"}
    assert running() == [1.0]
    live.last_window = {"score": 0.9, "machine": "full load"}  # a trained state's name
    assert running() == [1.0]
    # a stalled or dead microphone (state `fault`, whose message says machine null): the last
    # window's `running` stayed 1 as if current (in a review)
    live.last_state = {"state": "fault", "machine": None}
    assert running() == []


def test_the_anomaly_index_says_nothing_once_the_machine_stopped_a_minute_ago() -> None:
    """It took running windows only, so while the machine was off (or the microphone dead) it
    kept its last value for hours, which MQTT and /metrics sent as if fresh; and one score
    that was not a number made it NaN, which no JSON parser takes."""
    from edge.metrics import INDEX_SECONDS, AnomalyIndex

    index = AnomalyIndex(normal_median=2.0, hop_seconds=0.5)
    for _ in range(20):
        index.add(3.0)
    index.add(float("nan"))
    assert index.value == 1.5
    for _ in range(int(INDEX_SECONDS / 0.5) - 1):
        index.skip()
    assert index.value == 1.5, "a pause shorter than the index's minute: still the last minute"
    index.skip()
    assert index.value is None
    index.add(2.0)
    assert index.value is not None, "running again"
