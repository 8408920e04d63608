"""Retention after a clip never stops the daemon: an entry it cannot delete is skipped.

finish() runs at the end of every anomaly, before the event's `end` is published; an OSError
from retention there (here a directory named like an old clip) used to escape and end the
daemon at every anomaly.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from edge.clips import ClipRecorder

RATE = 16000
OLD_S = 3 * 86400
"""Older than the recorder's one-day age limit."""


def record_clip(rec: ClipRecorder, event_id: str) -> tuple[str, float] | None:
    """One second of audio, an anomaly over its second half, finished."""
    audio = np.full(RATE // 10, 0.1, np.float32)
    for _ in range(5):
        rec.push(audio)
    rec.start(event_id, first_sample=rec.ring.end, wall_time=time.time())
    for _ in range(5):
        rec.push(audio)
    return rec.finish(event_id)


def test_an_entry_retention_cannot_delete_is_skipped_and_the_clip_kept(
    tmp_path: Path, synced_clock: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = time.time() - OLD_S
    stuck = tmp_path / "20200101T000000Z-olddir.wav"
    stuck.mkdir()
    (stuck / "inside").write_bytes(b"x")
    os.utime(stuck, (old, old))
    removable = [tmp_path / f"2020010{i}T000000Z-old{i}.wav" for i in range(2, 5)]
    for path in removable:
        sf.write(path, np.zeros(RATE // 10, np.float32), RATE, "PCM_16")
        os.utime(path, (old, old))
    rec = ClipRecorder(tmp_path, RATE, preroll_s=0.2, max_age_days=1)

    with caplog.at_level(logging.INFO, logger="edge.clips"):
        name, seconds = record_clip(rec, "ev-one")
        second = record_clip(rec, "ev-two")  # the directory is still there: no second warning

    assert (tmp_path / name).is_file() and seconds > 0
    assert second is not None and (tmp_path / second[0]).is_file()
    assert not [p.name for p in removable if p.exists()], "old clips were kept"
    assert stuck.is_dir()
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and stuck.name in warned[0], warned


def test_clips_turned_off_are_still_deleted_at_their_age(
    tmp_path: Path, synced_clock: Path
) -> None:
    """With `[clips] enabled = false` no recorder was made, and retention went with it: clips
    already written (which may hold speech) stayed for good, though clips were turned off."""
    from conftest import DEMO_BUNDLE

    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.settings import Settings

    folder = tmp_path / "clips"
    folder.mkdir()
    old, kept = folder / "x-old.wav", folder / "x-recent.wav"
    for path, age in ((old, 40 * 86400), (kept, 3600)):
        sf.write(path, np.zeros(RATE, np.float32), RATE, "PCM_16")
        os.utime(path, (time.time() - age, time.time() - age))
    settings = Settings(device_id="c", model=DEMO_BUNDLE, data_dir=tmp_path,
                        clips={"enabled": False, "max_age_days": 30})  # fmt: skip
    Detector(settings, load_bundle(DEMO_BUNDLE), [], live=False).tick()  # a demo, a replay
    assert old.exists(), "only the device's daemon applies the device's limits"
    Detector(settings, load_bundle(DEMO_BUNDLE), []).tick()
    assert not old.exists() and kept.exists()


def test_a_clip_larger_than_the_size_limit_is_kept_for_the_event_that_names_it(
    tmp_path: Path,
) -> None:
    """A size limit below one clip deleted each clip as soon as it was written, while its
    `end` (and the CSV, and the page) named it; now the newest stays until the next one."""
    rec = ClipRecorder(tmp_path, RATE, preroll_s=0.2, max_total_mb=0.001, max_age_days=1)
    first = record_clip(rec, "ev-one")
    assert first is not None and (tmp_path / first[0]).is_file()
    assert (tmp_path / first[0]).stat().st_size > 1000  # larger than the limit on its own
    ahead = time.time() + 600  # the clock was set back since: the second looks the older
    os.utime(tmp_path / first[0], (ahead, ahead))
    second = record_clip(rec, "ev-two")
    assert second is not None and (tmp_path / second[0]).is_file()
    assert not (tmp_path / first[0]).exists()  # the older one made room, as the limit says
    assert rec.enforce_retention() == []  # and a housekeep keeps the newest too


def test_clips_of_this_run_outlive_older_ones_stamped_ahead_by_a_clock_set_back(
    tmp_path: Path,
) -> None:
    """A Pi without a real-time clock that boots behind (no network, no NTP yet): the clips of
    before the power cut carry later file times than the new ones, so at the size limit each
    new clip deleted the one before it, which the event log names, and the old ones stayed
    (in a review). Clips written in this run are the newest, in the order written."""
    rec = ClipRecorder(tmp_path, RATE, preroll_s=0.2, max_total_mb=1.0, max_age_days=30)
    size = (tmp_path / record_clip(rec, "ev-probe")[0]).stat().st_size
    for path in tmp_path.glob("*.wav"):
        path.unlink()
    ahead = time.time() + 6 * 3600  # written before the cut, by a clock 6 h ahead of this one
    old = []
    for i in range(int(1e6 // size) - 1):
        path = tmp_path / f"20270101T00000{i % 10}Z-old{i:04d}.wav"
        path.write_bytes(b"\0" * size)
        os.utime(path, (ahead + i, ahead + i))
        old.append(path)
    rec = ClipRecorder(tmp_path, RATE, preroll_s=0.2, max_total_mb=1.0, max_age_days=30)
    new = [tmp_path / record_clip(rec, f"ev-new{i}")[0] for i in range(3)]
    assert all(p.is_file() for p in new), [p.name for p in new if not p.is_file()]
    assert sum(p.is_file() for p in old) == len(old) - 2  # the oldest written made room


def test_clips_leave_room_on_a_nearly_full_card_and_say_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full card: each anomaly's clip failed with libsndfile's "System error", one ERROR line
    per anomaly (2,413 in 30 s), and clips filled the card again within a second of space being
    freed, so the spool and the event log kept failing (a review). Clips leave RESERVE_MB: the
    oldest go to keep it, and a clip that would take it is not saved, said once."""
    import edge.clips
    from edge.clips import RESERVE_MB

    free = {"mb": 1000.0}
    monkeypatch.setattr(edge.clips.ClipRecorder, "_free_mb", lambda self: free["mb"])
    rec = ClipRecorder(tmp_path, RATE, preroll_s=0.2, max_age_days=1)
    first = record_clip(rec, "ev-1")
    assert first is not None and (tmp_path / first[0]).is_file()
    real_delete = rec._delete

    def delete(path: Path) -> bool:  # each clip deleted gives its room back
        free["mb"] += path.stat().st_size / 1e6
        return real_delete(path)

    monkeypatch.setattr(rec, "_delete", delete)
    free["mb"] = RESERVE_MB + 0.02  # under a clip's 20 KB, until the oldest clip goes
    second = record_clip(rec, "ev-2")
    assert second is not None and (tmp_path / second[0]).is_file()
    assert not (tmp_path / first[0]).exists(), "the oldest made room"
    free["mb"] = 1.0  # nearly full, and nothing left to delete but what is being written
    (tmp_path / second[0]).unlink()
    with caplog.at_level(logging.DEBUG, logger="edge.clips"):
        assert [record_clip(rec, f"ev-{n}") for n in range(3, 8)] == [None] * 5
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "the disk is nearly full (1 MB free; clips leave 64 MB" in errors[0], errors
    assert not list(tmp_path.glob("*.wav"))


def test_a_card_another_program_filled_keeps_every_clip_when_deleting_them_would_not_do(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another program filled the card to 10 MB free: the next anomaly's clip deleted every
    older clip, which could never make its 64 MB of room, and was not saved either (a full-disk
    review): the evidence of every earlier event gone for nothing. They are now kept, said once."""
    import edge.clips

    free = {"mb": 1000.0}
    monkeypatch.setattr(edge.clips.ClipRecorder, "_free_mb", lambda self: free["mb"])
    rec = ClipRecorder(tmp_path, RATE, preroll_s=0.2, max_age_days=1)
    older = [record_clip(rec, f"ev-{n}") for n in range(3)]
    assert all(c is not None for c in older)
    free["mb"] = 10.0
    with caplog.at_level(logging.INFO, logger="edge.clips"):
        assert record_clip(rec, "ev-new") is None
    assert sorted(p.name for p in tmp_path.glob("*.wav")) == sorted(c[0] for c in older)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(said) == 1 and "the 3 older clip(s) are kept" in said[0], said


def _clip(folder: Path, name: str, stamped: float) -> Path:
    path = folder / name
    sf.write(path, np.zeros(RATE, np.float32), RATE, "PCM_16")
    os.utime(path, (stamped, stamped))
    return path


def test_no_clip_is_deleted_by_its_age_while_the_clock_is_not_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A Pi has no real-time clock: a clock 12 years ahead at start deleted every clip at once,
    for good (a clock review). While NTP has not set the clock (timesyncd runs, not yet
    synchronised) clips are kept by size only, said once; once it has, ages count again."""
    import edge.clock

    timesync = tmp_path / "timesync"
    timesync.mkdir()  # timesyncd runs, and has not set the clock
    monkeypatch.setattr(edge.clock, "TIMESYNCD", timesync)
    folder = tmp_path / "clips"
    folder.mkdir()
    old = _clip(folder, "old.wav", time.time() - OLD_S)
    rec = ClipRecorder(folder, RATE, max_age_days=1)
    with caplog.at_level(logging.INFO, logger="edge.clips"):
        assert rec.enforce_retention() == [] and rec.enforce_retention() == []
    assert old.exists()
    said = [r.getMessage() for r in caplog.records if "max_age_days waits" in r.getMessage()]
    assert said == [
        "retention: the system clock is not synchronised yet (NTP): clips are kept by [clips] "
        "max_total_mb only until it is, their ages unknown ([clips] max_age_days waits)"
    ]
    # this run's own clips go by the time since they were written: a site whose NTP server
    # is never reached kept them (they may hold speech) for good (a review)
    written = record_clip(rec, "ev1")
    assert written is not None
    mine = folder / written[0]
    rec._written_at[mine] -= 2 * 86400  # two days of this run (monotonic) since it was written
    assert rec.enforce_retention() == [mine] and old.exists()
    (timesync / "synchronized").touch()  # NTP has set it
    assert rec.enforce_retention() == [old] and not old.exists()


def test_clips_stamped_by_a_wrong_clock_age_from_when_it_is_set(
    tmp_path: Path, synced_clock: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run in 1970 (before NTP) wrote clips that the next run, with the clock set, deleted
    as 56 years old; clips stamped 2038 by a clock ahead were kept for good past max_age_days
    (a clock review). Stamped impossibly, they age from the time the clock is believed."""
    from edge import clock

    now = time.time()
    early = _clip(tmp_path, "19700101T010004Z-7adfa3f45ecb.wav", 3600.0)
    ahead = _clip(tmp_path, "20381202T184713Z-10c7c4c3c219.wav", now + 12 * 365 * 86400)
    old = _clip(tmp_path, "old.wav", now - OLD_S)
    outside = _clip(tmp_path.parent, f"{tmp_path.name}-outside.wav", 3600.0)
    (tmp_path / "link.wav").symlink_to(outside)  # not the clips' own: its time is left alone
    rec = ClipRecorder(tmp_path, RATE, max_age_days=1)
    with caplog.at_level(logging.INFO, logger="edge.clips"):
        removed = rec.enforce_retention()  # the link by its target's age; the target stays
    assert sorted(p.name for p in removed) == ["link.wav", old.name]
    for path in (early, ahead):
        assert abs(path.stat().st_mtime - now) < 60, path  # ages from now
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"{early.name} was stamped 1970-01-01 by a wrong clock: it ages from now" in said
    assert f"{ahead.name} was stamped 2038-" in said
    assert outside.exists() and outside.stat().st_mtime == 3600.0
    assert clock.believable(0.0) == "the system clock says 1970-01-01"
    assert clock.believable(now) is None


def test_clips_turned_off_by_a_reload_keep_the_ages_this_run_knows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the wall clock cannot be believed this run's clips go by the time since they were
    written; a reload that turned clips off made a new keeper that knew none of them, and they
    were kept for good (a review)."""
    from conftest import DEMO_BUNDLE

    import edge.clock
    from edge.bundle import load_bundle
    from edge.daemon import Detector
    from edge.settings import Settings

    timesync = tmp_path / "timesync"
    timesync.mkdir()  # timesyncd runs, and has not set the clock
    monkeypatch.setattr(edge.clock, "TIMESYNCD", timesync)
    settings = Settings(device_id="c", model=DEMO_BUNDLE, data_dir=tmp_path / "data",
                        clips={"max_age_days": 1})  # fmt: skip
    detector = Detector(settings, load_bundle(DEMO_BUNDLE), [])
    recorder = detector.clips
    assert recorder is not None
    written = record_clip(recorder, "ev1")
    assert written is not None
    clip = recorder.folder / written[0]
    off = Settings(device_id="c", model=DEMO_BUNDLE, data_dir=tmp_path / "data",
                   clips={"enabled": False, "max_age_days": 1})  # fmt: skip
    detector.apply_settings(off)
    keeper = detector._clip_keeper
    assert keeper is not None and keeper is not recorder
    keeper._written_at[clip] -= 2 * 86400  # two days of this run since it was written
    assert keeper.enforce_retention() == [clip]
