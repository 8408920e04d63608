"""Audio input: formats, rates, channels, and one clear line for bad files."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from conftest import ANOMALOUS_FILE, DEMO_BUNDLE, DEMO_CLIP, NORMAL_FILES, cli

from edge.audio_io import DOWNMIX, check_readable, find_audio, read_audio
from edge.errors import AudioError

RATE = 16000


def tone(freq: float, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.25 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_reads_8_channel_wave_format_extensible(tmp_path: Path) -> None:
    channels = np.stack([tone(200 * (c + 1), 1.0, RATE) * (c + 1) / 8 for c in range(8)], axis=1)
    path = tmp_path / "array.wav"
    sf.write(path, channels, RATE, format="WAVEX", subtype="PCM_16")
    assert sf.info(str(path)).format == "WAVEX"
    ch3 = read_audio(path, RATE, channel=3)
    np.testing.assert_allclose(ch3, channels[:, 3], atol=1e-4)
    mixed = read_audio(path, RATE, channel=DOWNMIX)
    np.testing.assert_allclose(mixed, channels.mean(axis=1), atol=1e-4)
    with pytest.raises(AudioError, match=r"channel 8 does not exist: the audio has 8 channels "
                       r"\(0 to 7\)$"):  # fmt: skip
        read_audio(path, RATE, channel=8)


def test_a_long_multichannel_file_is_read_in_blocks_with_the_same_result(tmp_path: Path) -> None:
    """A recorder's long 8-channel file at 48 kHz: only one block of it is ever held as
    floats (a Pi with 1 GB could not hold an hour of it whole), and what comes out is exactly
    what reading it whole, picking the channel and resampling gives."""
    rng = np.random.default_rng(7)
    seconds, rate = 40, 48000
    audio = (0.1 * rng.standard_normal((seconds * rate, 8))).astype(np.float32)
    audio[:, 5] += 0.2 * np.sin(2 * np.pi * 120 * np.arange(seconds * rate) / rate)
    path = tmp_path / "long.wav"
    sf.write(path, audio, rate, subtype="PCM_16")
    whole, _ = sf.read(path, dtype="float32", always_2d=True)
    expected = soxr.resample(whole[:, 5], rate, RATE, quality="HQ")
    mixed = soxr.resample(whole.mean(axis=1, dtype=np.float32), rate, RATE, quality="HQ")
    del whole
    tracemalloc.start()
    try:
        got = read_audio(path, RATE, channel=5, need_sound=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(read_audio(path, RATE, channel=DOWNMIX), mixed)
    as_floats = audio.nbytes  # 61 MB: what reading it whole allocates before anything else
    assert peak < 0.5 * as_floats, f"peak {peak / 1e6:.0f} MB for {as_floats / 1e6:.0f} MB"
    at_rate = tmp_path / "at_rate.flac"  # no resampling: every block's samples kept as read
    sf.write(at_rate, audio[: 25 * RATE, 5], RATE)
    np.testing.assert_array_equal(read_audio(at_rate, RATE), sf.read(at_rate, dtype="float32")[0])
    assert "MP3" in sf.available_formats()  # the soundfile wheel's libsndfile decodes it
    mp3 = tmp_path / "phone.mp3"  # its decoder garbles the audio where one read ends
    sf.write(mp3, tone(440, 25.0, RATE), RATE)
    np.testing.assert_allclose(read_audio(mp3, RATE), sf.read(mp3, dtype="float32")[0], atol=1e-6)
    loud = tmp_path / "pascal.wav"  # engineering units: the message gives the file's peak
    sf.write(loud, np.concatenate([np.full(RATE, 1.5), np.zeros(20 * RATE), [7.0]]), RATE,
             subtype="FLOAT")  # fmt: skip
    with pytest.raises(AudioError, match="float samples reach 7, beyond full scale"):
        read_audio(loud, RATE)


def test_what_is_read_is_held_once(tmp_path: Path) -> None:
    """Its blocks were kept in a list and joined at the end, so reading held the audio twice:
    an hour's file peaked at 0.46 GB for the 0.23 GB kept, the most of what `train` took on one
    1-h file. Two minutes at the model's rate: what is kept, and one read block beside it."""
    rng = np.random.default_rng(3)
    path = tmp_path / "two-minutes.wav"
    sf.write(path, (0.1 * rng.standard_normal(120 * RATE)).astype(np.float32), RATE, "PCM_16")
    tracemalloc.start()
    try:
        got = read_audio(path, RATE, need_sound=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(got, sf.read(path, dtype="float32")[0])
    assert peak < 1.3 * got.nbytes, f"peak {peak / 1e6:.1f} MB for {got.nbytes / 1e6:.1f} MB"


def test_samples_grow_past_a_header_that_undercounts_and_ignore_one_beyond_belief() -> None:
    """`read_audio` sets aside what the header counts; a file holding more (a stream's header,
    a decoder's estimate) grows the array, and a count of 2**62 (unknown) is not allocated."""
    from edge.audio_io import EXPECTED_MAX, Samples

    blocks = [np.arange(n, dtype=np.float32) + 100 * n for n in (3, 7, 1, 40)]
    for expected in (0, 5, 51, 2**62):
        kept = Samples(expected)
        for block in blocks:
            kept.add(block)
        np.testing.assert_array_equal(kept.samples(), np.concatenate(blocks))
    assert len(Samples(2**62)._data) == EXPECTED_MAX


@pytest.mark.parametrize(
    ("rate", "subtype"), [(44100, "PCM_24"), (48000, "FLOAT"), (22050, "PCM_U8")]
)
def test_any_rate_and_depth_is_resampled_to_the_model_rate(
    tmp_path: Path, rate: int, subtype: str
) -> None:
    path = tmp_path / f"tone{rate}.wav"
    sf.write(path, tone(440, 2.0, rate), rate, subtype=subtype)
    audio = read_audio(path, RATE)
    assert audio.dtype == np.float32
    assert abs(len(audio) - 2 * RATE) <= 1
    spectrum = np.abs(np.fft.rfft(audio[RATE // 2 : RATE // 2 + RATE]))
    assert abs(np.argmax(spectrum) - 440) <= 1


def test_flac_and_folders_are_found_recursively(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    sf.write(tmp_path / "a" / "b" / "x.flac", tone(300, 0.5, RATE), RATE)
    sf.write(tmp_path / "a" / "y.wav", tone(300, 0.5, RATE), RATE)
    (tmp_path / "a" / "notes.txt").write_text("not audio")
    found = find_audio([tmp_path])
    assert sorted(p.name for p in found) == ["x.flac", "y.wav"]
    assert len(read_audio(found[0], RATE)) == RATE // 2


def bad_files(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    good = tmp_path / "good.wav"
    sf.write(good, tone(440, 1.0, RATE), RATE, subtype="PCM_16")
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(good.read_bytes()[:20000])
    header_only = tmp_path / "header.wav"
    header_only.write_bytes(good.read_bytes()[:44])
    understated = tmp_path / "understated.wav"  # its data chunk's size says 100 bytes
    understated.write_bytes(_data_size(good.read_bytes(), 100))
    return {"text": text, "empty": empty, "truncated": truncated, "header only": header_only,
            "understated": understated}  # fmt: skip


def _data_size(wav: bytes, size: int) -> bytes:
    at = wav.index(b"data") + 4
    return wav[:at] + size.to_bytes(4, "little") + wav[at + 4 :]


def test_a_header_that_understates_the_audio_is_refused_not_cut_short(tmp_path: Path) -> None:
    """A data chunk that announced 100 bytes of a 1-s file: the rest was left out without a
    word (training on 3 ms of it, replay scoring nothing). A few pad bytes still pass."""
    understated = bad_files(tmp_path)["understated"]
    with pytest.raises(AudioError, match=r"damaged WAV header .* 100 bytes of audio"):
        read_audio(understated, RATE)
    with pytest.raises(AudioError, match="damaged WAV header"):
        check_readable(understated, 0, RATE)
    padded = tmp_path / "padded.wav"
    padded.write_bytes((tmp_path / "good.wav").read_bytes() + b"\0\0\0")
    assert len(read_audio(padded, RATE)) == RATE


@pytest.mark.parametrize("kind", ["text", "empty", "truncated", "header only", "understated"])
def test_bad_audio_gives_one_line_and_nonzero_exit(tmp_path: Path, kind: str) -> None:
    path = bad_files(tmp_path)[kind]
    for args in (
        ["replay", str(DEMO_BUNDLE), str(path)],
        ["evaluate", str(DEMO_BUNDLE), "--normal", str(path), "--anomalous", str(NORMAL_FILES[0])],
    ):
        proc = cli(*args, check=False)
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith("soundsentry: error: ") and str(path) in lines[0]
        assert "Traceback" not in proc.stderr


def test_missing_model_and_missing_file_give_one_line(tmp_path: Path) -> None:
    proc = cli("replay", str(tmp_path / "nope.bundle"), str(NORMAL_FILES[0]), check=False)
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        == f"soundsentry: error: {tmp_path / 'nope.bundle'}: no such model bundle"
    )
    proc = cli("replay", str(DEMO_BUNDLE), str(tmp_path / "missing.wav"), check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "No such file" in proc.stderr or "no such file" in proc.stderr


def test_audio_below_the_model_rate_is_refused_by_every_command(tmp_path: Path) -> None:
    low = tmp_path / "phone"
    low.mkdir()
    for src in NORMAL_FILES:  # the machine, but recorded at 8 kHz: nothing above 4 kHz
        audio = read_audio(src, RATE)
        sf.write(low / f"{src.stem}.wav", audio[::2], RATE // 2)
    first = sorted(low.iterdir())[0]
    for args in (
        ["train", "--normal", str(low), "--out", str(tmp_path / "low.bundle")],
        ["replay", str(DEMO_BUNDLE), str(first)],
        ["evaluate", str(DEMO_BUNDLE), "--normal", str(NORMAL_FILES[0]), "--anomalous", str(first)],
        ["calibrate", str(DEMO_BUNDLE), "--normal", str(low), "--out", str(tmp_path / "c")],
    ):
        proc = cli(*args, check=False)
        assert proc.returncode == 1, args
        (line,) = proc.stderr.strip().splitlines()
        assert str(first) in line and "recorded at 8000 Hz, below the model's 16000 Hz" in line
        assert "record at 16000 Hz or more" in line
    assert not (tmp_path / "low.bundle").exists()


def test_a_header_with_a_rate_no_recorder_makes_is_refused_by_every_command(
    tmp_path: Path,
) -> None:
    """A WAV header saying 2^31 - 1 Hz: evaluate, calibrate and spectrogram sized their read
    buffer from it (10 s: 80 GB) and stopped with a memory error (in a review)."""
    damaged = tmp_path / "damaged.wav"
    sf.write(damaged, read_audio(NORMAL_FILES[0], RATE), RATE, subtype="PCM_16")
    raw = bytearray(damaged.read_bytes())
    assert raw[24:28] == RATE.to_bytes(4, "little")  # the canonical 44-byte header's rate
    raw[24:28] = (2**31 - 1).to_bytes(4, "little")
    damaged.write_bytes(bytes(raw))
    with pytest.raises(AudioError, match="which no recorder makes"):
        read_audio(damaged, RATE)
    for args in (
        ["evaluate", str(DEMO_BUNDLE), "--normal", str(NORMAL_FILES[0]), "--anomalous",
         str(damaged)],
        ["calibrate", str(DEMO_BUNDLE), "--normal", str(damaged), "--out", str(tmp_path / "c")],
    ):  # fmt: skip
        proc = cli(*args, check=False)
        assert proc.returncode == 1, args
        (line,) = proc.stderr.strip().splitlines()
        assert str(damaged) in line and "2147483647 Hz, which no recorder makes" in line


def test_every_unusable_file_is_named_in_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "recordings"
    folder.mkdir()
    for src in NORMAL_FILES:
        (folder / src.name).write_bytes(src.read_bytes())
    for path in bad_files(tmp_path).values():
        (folder / f"bad-{path.name}").write_bytes(path.read_bytes())
    proc = cli("train", "--normal", str(folder), "--out", str(tmp_path / "m.bundle"), check=False)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("soundsentry: error: 5 of 9 files cannot be used: ")
    assert line.count(str(folder / "bad-")) == 3 and line.endswith("; and 2 more")


def test_replay_takes_folders_and_a_file_reached_twice_counts_once(tmp_path: Path) -> None:
    folder = tmp_path / "day1"
    folder.mkdir()
    for src in NORMAL_FILES[:2]:
        (folder / src.name).write_bytes(src.read_bytes())
    proc = cli("replay", str(DEMO_BUNDLE), str(folder), str(folder / NORMAL_FILES[0].name))
    assert proc.stderr.strip().splitlines()[-1].startswith("replay: 2 file(s), ")
    assert find_audio([folder, folder / NORMAL_FILES[1].name]) == sorted(folder.iterdir())


def test_replay_names_the_file_each_event_began_in_and_its_position_there(tmp_path: Path) -> None:
    """Over a folder of clips the events said only where they lay in all of them together."""
    import json

    # a 44.1-kHz copy of the normal clip first: the positions count the audio, not its samples
    normal = tmp_path / "a-normal.wav"
    sf.write(normal, soxr.resample(read_audio(NORMAL_FILES[0], RATE), RATE, 44100), 44100)
    proc = cli("replay", str(DEMO_BUNDLE), str(normal), str(ANOMALOUS_FILE))
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["type"] for e in events] == ["start", "end"]
    first = sf.info(str(normal)).duration
    for e in events:
        assert e["file"] == str(ANOMALOUS_FILE)
        assert e["file_offset_s"] == pytest.approx(e["stream_offset_s"] - first, abs=0.01)
        assert 0 <= e["file_offset_s"] <= sf.info(str(ANOMALOUS_FILE)).duration
    assert events[1]["file_offset_s"] - events[0]["file_offset_s"] == events[1]["duration_s"]


def test_replay_names_the_file_of_an_event_that_begins_with_it(tmp_path: Path) -> None:
    """An event on a file's first window was put at the end of the file before it whenever that
    one was not a whole number of milliseconds long (a Ctrl-C'd `record` chunk, a resampled
    file): the position, rounded to the millisecond, fell short of the boundary."""
    import json

    normal = read_audio(NORMAL_FILES[0], RATE)
    first = tmp_path / "1-normal.wav"  # 4 samples (0.25 ms) more than a whole second count
    sf.write(first, np.concatenate([normal, normal[:4]]), RATE, subtype="FLOAT")
    fault = tmp_path / "2-fault.wav"  # the demo's fault from its first window on
    sf.write(fault, read_audio(DEMO_CLIP, RATE)[int(5.2 * RATE) : int(10.8 * RATE)], RATE)
    proc = cli("replay", str(DEMO_BUNDLE), str(first), str(fault))
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["type"] for e in events] == ["start", "end"]
    assert [e["file"] for e in events] == [str(fault)] * 2
    assert events[0]["file_offset_s"] == 0.0
    assert events[1]["file_offset_s"] == events[1]["duration_s"]


def test_paths_that_are_no_recording_say_what_they_are(tmp_path: Path) -> None:
    """A pipe, a link loop and a folder given as one recording were all "no such file"."""
    import os

    os.mkfifo(tmp_path / "pipe.wav")
    (tmp_path / "a.wav").symlink_to(tmp_path / "b.wav")
    (tmp_path / "b.wav").symlink_to(tmp_path / "a.wav")
    (tmp_path / "folder.wav").mkdir()
    with pytest.raises(AudioError, match=r"not a file or folder \(a pipe or a device\)"):
        find_audio([tmp_path / "pipe.wav"])
    with pytest.raises(AudioError, match="a link that leads nowhere"):
        find_audio([tmp_path / "a.wav"])
    with pytest.raises(AudioError, match="a folder: give the recording's file"):
        read_audio(tmp_path / "folder.wav", RATE)
    with pytest.raises(AudioError, match="no such file or folder"):
        check_readable(tmp_path / "gone.wav")


def test_a_recording_cut_off_at_its_start_says_it_can_be_deleted(tmp_path: Path) -> None:
    """A power cut or a kill at the start of `record` leaves a 0-byte or header-only WAV, which
    stops training on the whole folder: the error said "Format not recognised" or "no audio
    samples", and nothing told the user the file was a recording cut off and safe to delete."""
    started = tmp_path / "started.wav"
    sf.write(started, np.zeros(0, np.float32), RATE, subtype="PCM_16")  # its header alone
    for path in (bad_files(tmp_path)["empty"], started):
        for check in (lambda p: read_audio(p, RATE), lambda p: check_readable(p, 0, RATE)):
            with pytest.raises(AudioError, match=r"cut off .* nothing is lost by deleting it"):
                check(path)


def test_one_rule_names_the_folders_no_search_for_audio_enters() -> None:
    """The searches for recordings, class folders and state folders each had a rule of their
    own (a state search entered `System Volume Information`, the others `$WinREAgent`)."""
    from edge.audio_io import skipped_folder

    for name in (".Trash-1000", ".git", "$RECYCLE.BIN", "$WinREAgent", "System Volume Information"):
        assert skipped_folder(name), name
    for name in ("pump", "off", "full load", "2026-12-03"):
        assert not skipped_folder(name), name


def test_a_replayed_mp3_is_read_whole_as_everywhere_else(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`replay` read files a second at a time, MP3s too, and libsndfile's MP3 decoder printed
    "error: part2_3_length (1088) too large for available bit count" where one read ended and
    the next began, though README says MP3s are read whole (in a walk-through)."""
    from edge.sources import NEW_STREAM, FileSource

    phone = tmp_path / "phone.mp3"
    sf.write(phone, read_audio(NORMAL_FILES[0], 16000), 16000, format="MP3")
    capfd.readouterr()
    heard = [b for b in FileSource([phone], 16000) if b is not NEW_STREAM]
    assert "error" not in capfd.readouterr().err
    np.testing.assert_array_equal(np.concatenate(heard), read_audio(phone, 16000))
    # ... up to a size: an hour of 48 kHz stereo read whole took 1.4 GB (a review)
    from edge import audio_io

    with sf.SoundFile(phone) as fh:
        assert len([b.copy() for b in audio_io.file_blocks(fh, 1.0)]) == 1
    monkeypatch.setattr(audio_io, "MP3_WHOLE_SAMPLES", 16000)
    with sf.SoundFile(phone) as fh:
        blocks = [b.copy() for b in audio_io.file_blocks(fh, 1.0)]
    assert len(blocks) == 5 and sum(map(len, blocks)) == 5 * 16000


def test_a_replayed_float_file_beyond_full_scale_is_refused_before_it_plays(
    tmp_path: Path,
) -> None:
    """`replay` took a float WAV in int16 units (peak 3.2e4) and raised a false event at a
    score of 856 without a word, where `calibrate` and `evaluate` refuse the same file in one
    line (in a review): a replayed stream is checked for it before any window. NaN samples
    still play: the stream's health watchdog reports them, as a microphone's."""
    from edge.sources import FileSource

    clip = read_audio(NORMAL_FILES[0], 16000)[:16000]
    good = tmp_path / "good.wav"
    sf.write(good, np.where(np.arange(len(clip)) == 999, np.nan, clip), 16000, subtype="FLOAT")
    bad = tmp_path / "bad.wav"
    sf.write(bad, clip * 32768, 16000, subtype="FLOAT")  # a logger's units, not audio
    FileSource([good], 16000)
    with pytest.raises(AudioError, match="beyond full scale") as caught:
        FileSource([good, bad], 16000)
    assert str(bad) in str(caught.value) and "\n" not in str(caught.value)


def test_a_cut_off_flac_is_refused_before_a_replay_plays_anything(tmp_path: Path) -> None:
    """A FLAC cut off mid-stream passes its header's check; libsndfile's decoder "lost sync"
    only when a replay reached it, which stopped there with a traceback and left the files after
    it unplayed, where `train`, `evaluate` and `calibrate` refuse the file in one line (a field
    review). A streamed compressed file is decoded through once before any window; one whole
    one still plays."""
    from edge.sources import FileSource

    whole = tmp_path / "whole.flac"
    sf.write(whole, read_audio(NORMAL_FILES[0], 16000)[: 4 * 16000], 16000)
    cut = tmp_path / "cut.flac"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert check_readable(cut)[0] == sf.info(str(whole)).frames  # the header cannot tell
    FileSource([whole], 16000)
    with pytest.raises(AudioError, match="not a readable audio file") as caught:
        FileSource([whole, cut], 16000)
    assert str(cut) in str(caught.value) and "\n" not in str(caught.value)


def test_a_peak_just_beyond_full_scale_reads_beyond_one(tmp_path: Path) -> None:
    """A float WAV peaking at 1.001 was refused as reaching "1, beyond full scale"."""
    near = tmp_path / "near.wav"
    sf.write(near, np.r_[np.zeros(16000), 1.001], 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"float samples reach 1\.001, beyond"):
        read_audio(near, RATE)


def test_a_loud_lossy_file_is_read_though_its_decoder_overshoots_full_scale(
    tmp_path: Path,
) -> None:
    """An Ogg of a clipped recording decodes to peaks of 1.04 (a lossy decoder overshoots), and
    was refused as float samples "beyond full scale", for a file that holds no floats at all (a
    diff review). Only a float file is refused for it."""
    t = np.arange(5 * RATE) / RATE
    loud = np.clip(1.5 * np.sin(2 * np.pi * 440 * t), -1, 1) * 0.999
    noisy = loud + 0.001 * np.random.default_rng(0).standard_normal(len(t))
    path = tmp_path / "loud.ogg"
    sf.write(path, np.clip(noisy, -1, 1), RATE)
    assert np.max(np.abs(sf.read(path)[0])) > 1.001  # the decoder's overshoot
    assert len(read_audio(path, RATE)) == 5 * RATE
