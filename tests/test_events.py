"""Event logic: K of the last N windows start an anomaly, M below end it."""

from __future__ import annotations

import pytest

from edge.events import EventDetector


def run(scores: list[float], **kw: int) -> list[tuple[str, int]]:
    det = EventDetector(threshold=1.0, **kw)
    out = []
    for i, s in enumerate(scores):
        t = det.feed(s, i * 0.5, i * 0.5 + 1.0)
        if t:
            out.append((t.kind, i))
    end = det.close()
    if end:
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


@pytest.mark.parametrize(("k", "n", "m"), [(0, 3, 1), (4, 3, 1), (2, 3, 0)])
def test_invalid_parameters_are_refused(k: int, n: int, m: int) -> None:
    with pytest.raises(ValueError):
        EventDetector(1.0, k, n, m)
