"""Event logic: K of the last N windows (or the CUSUM) start an anomaly, M below end it."""

from __future__ import annotations

import math

import pytest

from edge.events import Cusum, EventDetector, Transition


def run(scores: list[float], **kw: int) -> list[tuple[str, int]]:
    det = EventDetector(threshold=1.0, **kw)
    out = []
    for i, s in enumerate(scores):
        t = det.feed(s, i * 0.5, i * 0.5 + 1.0)
        if t:
            out.append((t.kind, i))
    end = det.close("end_of_stream")
    if end:
        assert end.ended_by == "end_of_stream"
        out.append(("close", len(scores)))
    return out


def test_k_of_n_starts_and_m_below_ends() -> None:
    lo, hi = 0.5, 2.0
    assert run([lo, hi, lo, hi, lo, lo, lo, lo, lo], k=2, n=3, m=4) == [("start", 3), ("end", 7)]


def test_isolated_spikes_do_not_start_an_event() -> None:
    assert run([2.0, 0.1, 0.1, 2.0, 0.1, 0.1, 2.0], k=2, n=3, m=2) == []


def test_an_open_event_is_closed_at_end_of_stream() -> None:
    assert run([2.0, 2.0, 2.0], k=2, n=3, m=4) == [("start", 1), ("close", 3)]


def test_event_statistics_and_times() -> None:
    det = EventDetector(threshold=1.0, k=2, n=3, m=1)
    det.feed(0.2, 0.0, 1.0)
    det.feed(3.0, 0.5, 1.5)
    start = det.feed(5.0, 1.0, 2.0)
    assert start and start.kind == "start" and start.started_s == 0.5
    end = det.feed(0.1, 1.5, 2.5)
    assert end and end.kind == "end" and end.event_id == start.event_id
    assert end.peak_score == 5.0 and end.mean_score == 4.0 and end.ended_s == 2.0
    assert end.ended_by == "normal" and start.ended_by is None


def test_an_end_says_why_and_an_unknown_reason_is_refused() -> None:
    det = EventDetector(threshold=1.0, k=2, n=3, m=1)
    det.feed(3.0, 0.0, 1.0)
    assert det.feed(3.0, 0.5, 1.5).kind == "start"
    assert det.close("muted").ended_by == "muted"
    assert det.close("muted") is None  # nothing open any more
    det.feed(3.0, 5.0, 6.0)
    assert det.feed(3.0, 5.5, 6.5).kind == "start"
    with pytest.raises(ValueError, match="unknown reason"):
        det.close("bored")


@pytest.mark.parametrize(("k", "n", "m"), [(0, 3, 1), (4, 3, 1), (2, 3, 0)])
def test_invalid_parameters_are_refused(k: int, n: int, m: int) -> None:
    with pytest.raises(ValueError):
        EventDetector(1.0, k, n, m)


# --- evidence over time (CUSUM) --------------------------------------------------------------

UNIT = Cusum(h=3.5, center=0.0, scale=1.0)
"""z = ln(score): a score of e^1.5 adds 1.0 to S, e^-1 takes 1.5 off."""


def feed_all(det: EventDetector, scores: list[float]) -> list[tuple[str, int, Transition]]:
    found = [det.feed(s, i * 0.5, i * 0.5 + 1.0) for i, s in enumerate(scores)]
    return [(t.kind, i, t) for i, t in enumerate(found) if t is not None]


def test_persistent_evidence_below_the_threshold_starts_and_ends_an_event() -> None:
    """S rises by 1 per window; it exceeds h = 3.5 at the 4th raised window. The event starts
    where S left zero and ends once M windows are below and S has come back to zero."""
    low, raised = math.exp(-1.0), math.exp(1.5)
    det = EventDetector(threshold=100.0, k=2, n=3, m=2, cusum=UNIT)
    out = feed_all(det, [low, low, raised, raised, raised, raised, low, low, low, low])
    assert [(kind, i) for kind, i, _ in out] == [("start", 5), ("end", 8)]
    start, end = out[0][2], out[1][2]
    assert start.started_s == 1.0 and start.peak_score == pytest.approx(raised)
    assert end.event_id == start.event_id and end.ended_s == 3.5
    assert det.evidence == 0.0 and not det.active


def test_a_single_spike_adds_at_most_cap_minus_drift() -> None:
    det = EventDetector(threshold=1e9, cusum=UNIT)
    assert det.feed(1e6, 0.0, 1.0) is None
    assert det.evidence == pytest.approx(UNIT.cap - UNIT.drift)


def test_an_open_event_lasts_while_the_evidence_does() -> None:
    """A K-of-N event on a machine that stays slightly raised does not end after M windows
    below the threshold: the CUSUM is still above zero, and the raised windows bring updates."""
    raised = math.exp(1.5)
    det = EventDetector(threshold=10.0, k=2, n=3, m=2, update_s=5.0, cusum=UNIT)
    out = feed_all(det, [20.0, 20.0] + [raised] * 20)
    assert [kind for kind, _, _ in out] == ["start", "update", "update"] and det.active
    assert det.evidence == pytest.approx(UNIT.h)


def test_close_resets_the_evidence() -> None:
    det = EventDetector(threshold=100.0, cusum=UNIT)
    det.feed(math.exp(2.0), 0.0, 1.0)
    assert det.evidence > 0
    det.close("muted")
    assert det.evidence == 0.0


def test_without_a_cusum_there_is_no_evidence_over_time() -> None:
    det = EventDetector(threshold=100.0, k=2, n=3, m=2)
    assert feed_all(det, [math.exp(3.0)] * 50) == [] and det.evidence == 0.0


@pytest.mark.parametrize(
    "params",
    [
        {"cusum": {"h": 1.0, "center": 0.0}},
        {"cusum": {"h": -1.0, "center": 0.0, "scale": 1.0}},
        {"cusum": {"h": 1.0, "center": 0.0, "scale": 1.0, "drift": 3.0, "cap": 3.0}},
        {"cusum": {"h": "nan", "center": 0.0, "scale": 1.0}},
        {"cusum": [1.0, 0.0, 1.0]},
    ],
)
def test_malformed_cusum_parameters_are_refused(params: dict) -> None:
    with pytest.raises(ValueError):
        Cusum.from_params(params)


def test_cusum_parameters_round_trip() -> None:
    assert Cusum.from_params({"cusum": UNIT.to_params()}) == UNIT
    assert Cusum.from_params({}) is None


def test_the_reasons_for_an_end_are_the_ones_the_event_schema_promises() -> None:
    import json
    from pathlib import Path

    from edge.events import ENDED_BY

    schema = json.loads(
        (Path(__file__).parent.parent / "edge" / "schemas" / "event.schema.json").read_text()
    )
    assert schema["properties"]["ended_by"]["enum"] == list(ENDED_BY)


def test_a_threshold_set_away_from_the_calibrated_one_moves_the_cusum_with_it() -> None:
    """set_threshold and `[detector] threshold` moved only the K-of-N path: a user who raised
    the threshold to quieten a machine kept getting `cusum` events at the calibrated level."""
    raised = math.exp(1.5)  # adds 1.0 to S per window at the calibrated level
    calibrated = EventDetector(threshold=100.0, k=2, n=3, m=2, cusum=UNIT)
    assert [kind for kind, _, _ in feed_all(calibrated, [raised] * 10)][:1] == ["start"]
    quieter = EventDetector(threshold=100.0, k=2, n=3, m=2, cusum=UNIT)
    quieter.threshold = 100.0 * math.exp(2.0)  # normal may now be e^2 times higher
    assert quieter.cusum.center == pytest.approx(2.0)
    assert feed_all(quieter, [raised] * 50) == []
    quieter.threshold = 100.0
    assert quieter.cusum == UNIT
    overridden = EventDetector(threshold=100.0 * math.exp(2.0), cusum=UNIT, calibrated=100.0)
    assert overridden.cusum.center == pytest.approx(2.0)  # a threshold from the settings
    for odd in (math.inf, math.nan, 0.0):  # what K of N can do with it; the CUSUM stays whole
        assert EventDetector(threshold=odd, cusum=UNIT, calibrated=100.0).cusum == UNIT


def test_a_threshold_set_below_the_calibrated_one_leaves_the_cusum_at_its_budget() -> None:
    """Lowered, the threshold moved the CUSUM's normal level down with it: a 20 % lower threshold
    is a spread or two of the normal log score, and the CUSUM climbed on normal audio (an event
    36 % of a simulated day, in a review). K of N is what a lower threshold makes sensitive."""
    louder = EventDetector(threshold=50.0, k=2, n=3, m=2, cusum=UNIT, calibrated=100.0)
    assert louder.cusum == UNIT
    assert feed_all(louder, [math.exp(0.3)] * 100) == []  # normal running, just below the drift
    assert [kind for kind, _, _ in feed_all(louder, [60.0] * 3)] == ["start"]  # K of N is louder


def test_an_event_ends_where_its_evidence_did_not_where_the_cusum_came_down() -> None:
    """Held at h while an event is open, the CUSUM counted every window above its drift on the
    way back down as evidence: a 5.5-s fault was reported 14 s long (median) with a mean
    diluted by normal windows (in a review). Only windows that keep it at h count."""
    fault, low, mild = 1000.0, math.exp(-1.0), math.exp(0.8)  # mild: z 0.8, above the drift
    det = EventDetector(threshold=100.0, k=2, n=3, m=2, cusum=UNIT)
    out = feed_all(det, [fault] * 4 + [low, mild] * 5 + [low] * 4)
    assert [kind for kind, _, _ in out] == ["start", "end"]
    end = out[-1][2]
    assert end.ended_s == 2.5 and end.mean_score == pytest.approx(fault), end
