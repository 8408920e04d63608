"""Training: the real `train` command on fixture audio, int8 vs float, determinism, evaluate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from conftest import (
    ANOMALOUS_FILE,
    DEMO_BUNDLE,
    DEMO_CLIP,
    NORMAL_FILES,
    ROOT,
    SOUNDSENTRY,
    TINY_EPOCHS,
    cli,
    train_tiny,
)

from edge.audio_io import read_audio
from edge.bundle import MODEL_INT8, load_bundle
from edge.detectors.base import MIN_FEATURE_STD
from edge.features import windows_of
from edge.scoring import Scorer
from train.knn import fit_bank
from train.metrics import spearman
from train.statistics import fit_statistics

MIN_SPEARMAN = 0.95
MIN_AUC = 0.95
"""The fixture fault is plain: the tiny model scores its segments about three times as high
as normal ones (AUC 1.0 when written); a model that cannot tell them apart fails this."""


def test_train_writes_a_valid_bundle(tiny_bundle: Path) -> None:
    b = load_bundle(tiny_bundle)
    m = b.manifest
    assert tiny_bundle.parent.name == "nested"  # --out's parent folders were created
    assert m.kind == "autoencoder" and m.input.dtype == "int8" and m.output.dtype == "int8"
    assert m.training.seed == 1 and m.training.epochs == int(TINY_EPOCHS)
    assert len(m.training.files) + len(m.training.holdout_files) >= len(NORMAL_FILES) - 1
    assert (
        m.threshold.rule == "false-alarm-budget/gamma" and m.threshold.value > m.normal_scores.p50
    )
    assert (tiny_bundle / MODEL_INT8).stat().st_size < 256 * 1024


def test_int8_ranks_windows_like_float(tiny_bundle: Path) -> None:
    int8 = Scorer.from_bundle(load_bundle(tiny_bundle, "int8"))
    flt = Scorer.from_bundle(load_bundle(tiny_bundle, "float"))
    p = load_bundle(tiny_bundle).features
    windows = np.concatenate(
        [
            windows_of(read_audio(f, p.samplerate), p)
            for f in [*NORMAL_FILES, ANOMALOUS_FILE, DEMO_CLIP]
        ]
    )
    rho = spearman(int8.score_many(windows), flt.score_many(windows))
    assert rho >= MIN_SPEARMAN, rho


def test_same_seed_same_model(tiny_bundle: Path, tmp_path: Path) -> None:
    again = train_tiny(tmp_path / "again.bundle")
    assert (again / MODEL_INT8).read_bytes() == (tiny_bundle / MODEL_INT8).read_bytes()
    first = load_bundle(tiny_bundle).manifest
    assert first.training.augment is None  # trained without --augment, and said so
    assert load_bundle(again).manifest.threshold.value == first.threshold.value


def test_evaluate_refuses_a_file_given_as_normal_and_anomalous() -> None:
    """A fault recording inside the folder given as normal counted on both sides: AUC 0.500
    and no word of why."""
    proc = cli("evaluate", str(DEMO_BUNDLE), "--normal", str(ANOMALOUS_FILE.parent),
               "--anomalous", str(ANOMALOUS_FILE), check=False)  # fmt: skip
    assert proc.returncode == 1 and "AUC" not in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == (
        f"soundsentry: error: 1 file(s) given as both normal and anomalous: {ANOMALOUS_FILE}"
    )


def test_evaluate_never_writes_over_its_recordings_and_gives_no_pauc_it_did_not_measure(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """`evaluate --json` wrote over one of the recordings it evaluated, and its JSON gave a
    pAUC of 1.0 that the printout called n/a (two normal items: none to rest on) (a review);
    a --report folder inside the recordings and outputs where nothing can be written were
    found only after the scoring (a later review)."""
    audio = tmp_path / "audio"
    audio.mkdir()
    normal = [str(shutil.copy(f, audio)) for f in NORMAL_FILES[:2]]
    kept = Path(normal[0]).read_bytes()
    given = ("evaluate", str(tiny_bundle), "--normal", *normal, "--anomalous", str(ANOMALOUS_FILE))
    proc = cli(*given, "--json", normal[0], check=False)
    assert proc.returncode == 1 and "exists and is not JSON" in proc.stderr, proc.stderr
    assert Path(normal[0]).read_bytes() == kept
    # nor over the manifest of the bundle it evaluates, nor anything else into a bundle: the
    # model no longer loaded ("not a SoundSentry bundle manifest", an ML review)
    model = shutil.copytree(tiny_bundle, tmp_path / "model.bundle")
    manifest = (model / "manifest.json").read_bytes()
    for into in (model / "manifest.json", model / "evaluation.json"):
        proc = cli(*given[:1], str(model), *given[2:], "--json", str(into), check=False)
        assert proc.returncode == 1, proc.stdout
        assert f"--json {into}: lies in the model bundle {model}" in proc.stderr, proc.stderr
    assert (model / "manifest.json").read_bytes() == manifest
    assert not (model / "evaluation.json").exists()
    searched = ("evaluate", str(tiny_bundle), "--normal", str(audio), "--anomalous",
                str(ANOMALOUS_FILE))  # fmt: skip
    for args in (given, searched):  # a folder within a folder searched: a class of --classes
        for report in (audio, audio / "report") if args is searched else (audio,):
            proc = cli(*args, "--report", str(report), check=False)
            assert proc.returncode == 1, proc.stdout
            assert "lies in the recordings being evaluated" in proc.stderr, proc.stderr
    assert sorted(p.name for p in audio.iterdir()) == sorted(Path(n).name for n in normal)
    # where nothing can be written, refused before the scoring, not after it (a review)
    linked = tmp_path / "linked.json"  # its target's folder is where it is written
    linked.symlink_to("/proc/soundsentry.json")
    for flag, where in (("--json", "/proc/soundsentry.json"), ("--report", "/proc/report"),
                        ("--json", str(linked))):  # fmt: skip
        proc = cli(*given, flag, where, check=False)
        assert proc.returncode == 1 and "AUC" not in proc.stdout, proc.stdout
        assert f"{flag} {where}: no file can be written in /proc" in proc.stderr, proc.stderr
    sent = tmp_path / "sent.json"  # `--json /dev/stdout > sent.json`: into that file
    with sent.open("w") as out:
        done = subprocess.run([*SOUNDSENTRY, *given, "--json", "/dev/stdout"], stdout=out,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(sent.read_text())["n_normal"] == 2  # replaced whole: the JSON alone
    out = tmp_path / "eval.json"
    out.write_text("{}\n")  # an earlier evaluation's: replaced
    assert "pAUC(FPR<=0.1) n/a" in cli(*given, "--json", str(out)).stdout
    data = json.loads(out.read_text())
    assert data["n_normal"] == 2 and data["pauc"] is None and data["auc"] is not None
    link = tmp_path / "latest.json"  # written through a link, which stays (a second review)
    link.symlink_to(out)
    out.write_text("{}\n")
    cli(*given, "--json", str(link))
    assert link.is_symlink() and json.loads(out.read_text())["n_normal"] == 2


def test_evaluate_says_what_events_on_normal_files_and_an_auc_below_chance_mean(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """A new user's walk-through: normal files with an event at the model's threshold, one
    set for a false alarm a day, and an AUC of 0.300, were printed without a word on what they
    mean for the device; a later one could not tell which files raised the events, to listen
    to them (nor which faults went unreported). Here the labels are swapped: the fault is
    called normal."""
    out = tmp_path / "eval.json"
    proc = cli("evaluate", str(tiny_bundle), "--normal", str(ANOMALOUS_FILE),
               "--anomalous", *map(str, NORMAL_FILES[2:4]), "--json", str(out))  # fmt: skip
    assert "normal 1/1" in proc.stdout, proc.stdout
    assert (
        f"1 of 1 normal file(s) raised an event at the model's threshold ({ANOMALOUS_FILE}): "
        "at least" in proc.stderr
    ), proc.stderr
    assert f"\nnormal files with an event: {ANOMALOUS_FILE}\n" in proc.stdout + "\n", proc.stdout
    quiet = [str(f) for f in NORMAL_FILES[2:4]]
    assert f"anomalous files without one: {quiet[0]}, {quiet[1]}" in proc.stdout, proc.stdout
    data = json.loads(out.read_text())
    assert data["normal_files_raising"] == [str(ANOMALOUS_FILE)], data
    assert data["anomalous_files_silent"] == quiet, data
    assert "against the 1 a day it was set for" in proc.stderr, proc.stderr
    assert "is below 0.5: this detector scores these normal recordings above" in proc.stderr


def test_evaluate_prints_and_writes_json(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports" / "eval.json"
    proc = cli(
        "evaluate",
        str(tiny_bundle),
        "--normal",
        *map(str, NORMAL_FILES[:2]),
        "--anomalous",
        str(ANOMALOUS_FILE),
        "--segment",
        "1",
        "--json",
        str(out),
    )
    assert "AUC" in proc.stdout and "pAUC" in proc.stdout
    data = json.loads(out.read_text())
    assert {"auc", "pauc", "n_normal", "n_anomalous"} <= set(data)
    assert (data["n_normal"], data["n_anomalous"]) == (10, 4)
    assert data["auc"] >= MIN_AUC, data
    assert data["pauc"] >= MIN_AUC, data  # at false-positive rates up to 0.1
    whole = cli(
        "evaluate",
        str(tiny_bundle),
        "--float",
        "--normal",
        *map(str, NORMAL_FILES),
        "--anomalous",
        str(ANOMALOUS_FILE),
    )
    assert "(float), whole files" in whole.stdout and "normal 4  anomalous 1" in whole.stdout
    # 4 normal items: no false-positive rate up to 0.1 can be measured, and it says so
    assert "only 4 normal item(s): the pAUC" in whole.stderr, whole.stderr
    assert "pAUC(FPR<=0.1) n/a" in whole.stdout, whole.stdout  # not a figure beside the AUC
    assert "pAUC(FPR<=0.1) n/a" not in proc.stdout, proc.stdout
    assert "normal item(s)" not in proc.stderr, "10 segments are enough"


def test_evaluate_counts_the_files_the_device_would_report(tmp_path: Path) -> None:
    """It printed TPR and FPR of each file's mean score against the per-window threshold, which
    the device applies with K-of-N and the CUSUM: not what it would report. It now counts the
    files whose windows raise an event in the real event logic, as `replay` (the daemon's
    pipeline, each file its own stream) does."""
    normal, anomalous = [NORMAL_FILES[3]], [ANOMALOUS_FILE, DEMO_CLIP]
    out = tmp_path / "eval.json"
    proc = cli("evaluate", str(DEMO_BUNDLE), "--normal", *map(str, normal), "--anomalous",
               *map(str, anomalous), "--json", str(out))  # fmt: skip
    data = json.loads(out.read_text())

    def replayed(files: list[Path]) -> str:
        raised = [
            any(json.loads(line)["type"] == "start"
                for line in cli("replay", str(DEMO_BUNDLE), str(f)).stdout.splitlines())
            for f in files
        ]  # fmt: skip
        return f"{sum(raised)}/{len(files)}"

    assert data["normal_files_with_event"] == replayed(normal) == "0/1"
    assert data["anomalous_files_with_event"] == replayed(anomalous) == "2/2"
    assert "tpr_at_threshold" not in data
    assert "files with an event at threshold" in proc.stdout
    assert "anomalous 2/2, normal 0/1" in proc.stdout
    assert "files with an event:" not in proc.stdout and "without one" not in proc.stdout
    assert data["normal_files_raising"] == data["anomalous_files_silent"] == [], data


def test_a_report_replaces_an_earlier_report_and_nothing_else(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """`evaluate --report DIR` replaced a user's own scores.csv and metrics.json, and a
    recording named timeline.png, without a word, where `--json` refuses what is not JSON (a
    review): it is refused before the scoring, and the files stay as they were."""
    given = ("evaluate", str(tiny_bundle), "--normal", *map(str, NORMAL_FILES[:2]),
             "--anomalous", str(ANOMALOUS_FILE))  # fmt: skip
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "scores.csv").write_text("machine,hours\npump,1200\n")
    shutil.copy(NORMAL_FILES[0], mine / "timeline.png")
    (mine / "notes.txt").write_text("not a name the report writes\n")
    kept = {p.name: p.read_bytes() for p in mine.iterdir()}
    proc = cli(*given, "--report", str(mine), check=False)
    assert proc.returncode == 1 and "AUC" not in proc.stdout, proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == (
        f"soundsentry: error: --report {mine}: holds scores.csv, timeline.png, which the report "
        "would replace and no report wrote; give a new or empty folder"
    )
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == kept
    earlier = tmp_path / "earlier"  # what a report wrote there before: replaced
    earlier.mkdir()
    (earlier / "metrics.json").write_text('{"int8": {}}\n')
    (earlier / "roc.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (earlier / "scores.csv").write_text("file,segment,label,score_int8\nold.wav,,normal,1\n")
    cli(*given, "--report", str(earlier))
    assert "old.wav" not in (earlier / "scores.csv").read_text()
    assert set(json.loads((earlier / "metrics.json").read_text())["int8"]) >= {"auc", "pauc"}


def test_evaluate_report_files(tiny_bundle: Path, tmp_path: Path) -> None:
    report = tmp_path / "report"
    proc = cli(
        "evaluate",
        str(tiny_bundle),
        "--normal",
        *map(str, NORMAL_FILES),
        "--anomalous",
        str(ANOMALOUS_FILE),
        str(DEMO_CLIP),
        "--segment",
        "1",
        "--report",
        str(report),
    )
    assert "report written" in proc.stdout
    said = proc.stdout.split("report written to ", 1)[1].splitlines()[0].split(": ", 1)[1]
    assert sorted(said.split(", ")) == sorted(p.name for p in report.iterdir()), said  # every
    # file it wrote (the evaluation files went unnamed)
    for name in ("roc.png", "histogram.png", "timeline.png"):
        data = (report / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, name
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics) == {"int8", "float"}
    assert {"auc", "pauc", "n_normal", "n_anomalous"} <= set(metrics["int8"])
    rows = (report / "scores.csv").read_text().splitlines()
    assert rows[0] == "file,segment,label,score_int8,score_float"
    assert len(rows) == 1 + metrics["int8"]["n_normal"] + metrics["int8"]["n_anomalous"]
    scores: dict[str, list[float]] = {}
    for row in rows[1:]:
        name, _, _, int8, _ = row.split(",")
        scores.setdefault(Path(name).name, []).append(float(int8))
    fault, demo = scores.pop(ANOMALOUS_FILE.name), scores.pop(DEMO_CLIP.name)
    normal = [x for xs in scores.values() for x in xs]
    threshold = load_bundle(tiny_bundle).manifest.threshold.value
    assert len(fault) == 4 and len(normal) == 20 and len(demo) == 15, scores
    # Every segment of the faulty fan is above the calibrated threshold and above every
    # normal segment (the model separates the fault, not merely ranks it a little higher) ...
    assert min(fault) > threshold and min(fault) > max(normal), (fault, threshold, max(normal))
    # ... and in the demo clip (normal, a fault from 5 to 11 s, normal) it is the fault's
    # segments that cross the threshold, give or take the segment at each edge.
    above = {i for i, x in enumerate(demo) if x > threshold}
    assert set(range(6, 10)) <= above <= set(range(4, 12)), (demo, threshold)


def test_spectrogram_png(tmp_path: Path) -> None:
    out = tmp_path / "figs" / "spec.png"
    cli("spectrogram", str(DEMO_CLIP), "--out", str(out))
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 10000
    proc = cli("spectrogram", str(tmp_path / "missing.wav"), "--out", str(out), check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    jpg = tmp_path / "figs" / "spec.jpg"  # the format the name asks for
    named = cli("spectrogram", str(DEMO_CLIP), "--out", str(jpg))
    assert named.stdout.strip() == f"spectrogram written to {jpg}"
    assert jpg.read_bytes().startswith(b"\xff\xd8\xff")
    odd = cli("spectrogram", str(DEMO_CLIP), "--out", str(tmp_path / "figs" / "spec.log"))
    written = tmp_path / "figs" / "spec.log.png"  # a PNG, and the line names the real file
    assert odd.stdout.strip() == f"spectrogram written to {written}"
    assert written.read_bytes().startswith(b"\x89PNG")


def test_network_bundles_count_all_their_audio_and_evaluate_names_fitted_files(
    tiny_bundle: Path,
) -> None:
    m = load_bundle(tiny_bundle).manifest
    total = sum(sf.info(str(f)).duration for f in NORMAL_FILES)
    assert m.training.seconds == pytest.approx(total, abs=0.1), "fitted + held out, as numpy"
    assert 0 < m.training.holdout_seconds < m.training.seconds
    proc = cli("evaluate", str(tiny_bundle), "--normal", *map(str, NORMAL_FILES), "--anomalous",
               str(ANOMALOUS_FILE))  # fmt: skip
    fitted = {f.name for f in m.training.files}
    for path in NORMAL_FILES:
        named = f"{path}: the model was fitted on this recording" in proc.stderr
        assert named == (path.name in fitted), path


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "100000"], "--epochs: must be a whole number from 1 to 1000"),
        (["--epochs", "0"], "--epochs: must be a whole number from 1 to 1000"),
        (["--augment-factor", "1000"], "--augment-factor: must be a whole number from 1 to 16"),
    ],
)
def test_a_network_s_epochs_and_copies_are_bounded_before_anything_is_read(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    """`--epochs 100000` trained for days without a word, and `--augment-factor 1000` held a
    thousand copies of the training windows in memory before training began (the training
    review): refused by the argument parser, naming the range."""
    out = tmp_path / "m.bundle"
    proc = cli("train", "--normal", *map(str, NORMAL_FILES), "--detector", "autoencoder",
               "--out", str(out), *flags, check=False)  # fmt: skip
    assert proc.returncode == 1 and message in proc.stderr and not out.exists(), proc.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "3"], "--epochs trains a network; --detector fluctuation is fitted in numpy"),
        (["--detector", "subspace", "--augment", "noise"], "--augment is for the autoencoder"),
        (["--detector", "knn", "--epochs", "3"], "--detector knn is fitted in numpy"),
    ],
)
def test_flags_the_trainer_would_ignore_are_refused(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    out = tmp_path / "m.bundle"
    proc = cli("train", "--normal", *map(str, NORMAL_FILES), "--out", str(out), *flags,
               check=False)  # fmt: skip
    assert proc.returncode == 1 and message in proc.stderr and not out.exists()
    assert len(proc.stderr.strip().splitlines()) == 1


def test_normal_states_refuse_another_detector_by_name(tmp_path: Path) -> None:
    states = tmp_path / "states"
    (states / "running").mkdir(parents=True)
    proc = cli("train", "--normal-states", str(states), "--detector", "autoencoder", "--out",
               str(tmp_path / "s.bundle"), check=False)  # fmt: skip
    assert proc.returncode == 1
    assert (
        "--normal-states trains the embedding or --detector fluctuation, levels, knn, subspace, "
        "not autoencoder"
    ) in proc.stderr


def test_train_out_checks_and_model_ids_from_any_folder_name(tmp_path: Path) -> None:
    recordings = tmp_path / "recordings"
    recordings.mkdir()
    (recordings / "keep.wav").write_bytes(NORMAL_FILES[0].read_bytes())
    clash = cli("train", "--normal", *map(str, NORMAL_FILES), "--out", str(recordings),
                check=False)  # fmt: skip
    assert clash.returncode == 1 and "holds other files and no model bundle" in clash.stderr
    assert sorted(p.name for p in recordings.iterdir()) == ["keep.wav"]
    named = tmp_path / "pump 3 café.bundle"
    cli("train", "--normal", *map(str, NORMAL_FILES), "--out", str(named))
    assert load_bundle(named).model_id.startswith("pump-3-caf-")


def test_training_over_a_bundle_leaves_none_of_its_old_files(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pump.bundle"
    shutil.copytree(tiny_bundle, out)
    (out / "notes.txt").write_text("the user's own file stays")
    cli("train", "--normal", *map(str, NORMAL_FILES), "--out", str(out))
    assert sorted(p.name for p in out.iterdir()) == ["arrays.npz", "manifest.json", "notes.txt"]
    assert load_bundle(out).manifest.kind == "fluctuation"


def test_record_s_mono_files_train_a_model_of_the_channel_given(tmp_path: Path) -> None:
    """`record --channel 3` writes mono files of channel 3, and `train --channel 3` on them
    stopped with "channel 3 does not exist" where evaluate, replay and calibrate read a mono file
    as its one channel; a folder mixing them with 4-channel recordings said nothing of them."""
    mono = tmp_path / "mono"
    mono.mkdir()
    for src in NORMAL_FILES:
        sf.write(mono / f"{src.stem}.wav", read_audio(src, 16000), 16000)
    proc = cli(
        "train", "--normal", str(mono), "--channel", "3", "--out", str(tmp_path / "m.bundle")
    )
    assert (
        "note: mono recordings: each one's only channel is trained on as channel 3" in proc.stdout
    )
    model = load_bundle(tmp_path / "m.bundle")
    assert model.manifest.training.channel == 3
    same = cli("train", "--normal", str(mono), "--out", str(tmp_path / "c0.bundle"))
    assert load_bundle(tmp_path / "c0.bundle").threshold == pytest.approx(model.threshold)
    assert "note:" not in same.stdout
    mixed = tmp_path / "mixed"
    shutil.copytree(mono, mixed)
    sf.write(mixed / "array.wav", np.stack([read_audio(NORMAL_FILES[0], 16000)] * 4, axis=1), 16000)
    phone = read_audio(NORMAL_FILES[1], 16000)
    sf.write(mixed / "stereo.wav", np.stack([phone, phone], axis=1), 16000)
    proc = cli("train", "--normal", str(mixed), "--channel", "1", "--out", str(tmp_path / "x"))
    said = "note: 2- to 4-channel recordings: training on channel 1; the 4 mono one(s) as they are"
    assert said in proc.stdout, proc.stdout  # the stereo file is not left unsaid (a walk-through)


def test_copies_count_once_and_channels_are_not_seconds(tmp_path: Path) -> None:
    arrays = tmp_path / "array"
    arrays.mkdir()
    for src in NORMAL_FILES:  # 4-channel recordings: the channels are views, not more time
        mono = read_audio(src, 16000)
        sf.write(arrays / f"{src.stem}.wav", np.stack([mono] * 4, axis=1), 16000)
    (arrays / "copy of 0.wav").write_bytes((arrays / f"{NORMAL_FILES[0].stem}.wav").read_bytes())
    out = tmp_path / "m.bundle"
    proc = cli("train", "--normal", str(arrays), "--all-channels", "--out", str(out))
    total = sum(sf.info(str(f)).duration for f in NORMAL_FILES)
    m = load_bundle(out).manifest
    assert m.training.seconds == pytest.approx(total, abs=0.1)
    # the threshold too is backed by the recordings' held-out time, not four channels' worth
    assert m.threshold.params["holdout_seconds"] == pytest.approx(m.training.holdout_seconds)
    assert m.threshold.params["n_windows"] > 3 * m.training.holdout_seconds  # 4 views scored
    names = {f.name for f in m.training.files} | {f.name for f in m.training.holdout_files}
    assert len(names) == len(NORMAL_FILES), "the copy is used once"
    assert f"{NORMAL_FILES[0].stem}.wav is a copy of {arrays / 'copy of 0.wav'}" in proc.stderr
    mono = cli("train", "--normal", str(arrays), "--out", str(tmp_path / "c0.bundle"))
    assert "note: 4-channel recordings: training on channel 0" in mono.stdout
    both = cli("train", "--normal", str(arrays), "--all-channels", "--channel", "3",
               "--out", str(tmp_path / "c3.bundle"), check=False)  # fmt: skip
    assert both.returncode == 1 and not (tmp_path / "c3.bundle").exists()  # was: --channel ignored
    assert both.stderr.strip().splitlines() == [
        "soundsentry: error: --channel picks one channel; --all-channels trains on every one"
    ]


def test_evaluate_with_nothing_to_score_and_an_output_path_that_is_a_folder(
    tmp_path: Path,
) -> None:
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(8000, np.float32) + 0.01, 16000)  # half a window
    model = str(DEMO_BUNDLE)
    proc = cli("evaluate", model, "--normal", str(NORMAL_FILES[0]), "--anomalous", str(short),
               check=False)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "soundsentry: error: no anomalous audio left to score: every anomalous file is shorter "
        "than one window (1 s), or silent, or the machine off"
    )
    proc = cli("evaluate", model, "--normal", str(NORMAL_FILES[0]), "--anomalous",
               str(ANOMALOUS_FILE), "--json", str(tmp_path), check=False)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (  # said before scoring, naming the flag
        f"soundsentry: error: --json {tmp_path}: is a folder; give a file name"
    )
    assert proc.stdout == ""


def test_file_names_that_are_not_utf8_reach_the_report_and_the_spectrogram(
    tmp_path: Path,
) -> None:
    """A name from an old FAT stick or another locale: scores.csv stopped half-written with a
    UnicodeEncodeError, and `spectrogram` with a TypeError from its title (in a review)."""
    odd = os.fsdecode(bytes(tmp_path) + b"/fan-\xff\xfe.wav")
    shutil.copy(ANOMALOUS_FILE, odd)
    report = tmp_path / "rep"
    cli("evaluate", str(DEMO_BUNDLE), "--normal", str(NORMAL_FILES[0]), "--anomalous", odd,
        "--report", str(report), "--timeline", odd)  # fmt: skip
    rows = (report / "scores.csv").read_text(encoding="utf-8").splitlines()
    assert any(row.startswith(f"{tmp_path}/fan-\\xff\\xfe.wav,") for row in rows), rows[:3]
    assert (report / "timeline.png").read_bytes().startswith(b"\x89PNG")
    picture = tmp_path / "spec.png"
    cli("spectrogram", "--model", str(DEMO_BUNDLE), odd, "--out", str(picture))
    assert picture.read_bytes().startswith(b"\x89PNG")
    # named among the normal files with an event: printed escaped, and in the JSON as its items
    # name it (the two forms differed, and a script could not join them: a diff review)
    out = tmp_path / "eval.json"
    proc = cli("evaluate", str(DEMO_BUNDLE), "--normal", odd, "--anomalous", str(DEMO_CLIP),
               "--json", str(out))  # fmt: skip
    assert f"normal files with an event: {tmp_path}/fan-\\xff\\xfe.wav" in proc.stdout, proc.stdout
    data = json.loads(out.read_text())
    assert data["normal_files_raising"] == [i["file"] for i in data["items"] if i["label"] == 0]


def test_evaluate_counts_events_with_a_device_s_detector_settings(tmp_path: Path) -> None:
    """`evaluate` counted events at the bundle's K, N and threshold only, while the device
    (and `replay` with its config) ran its `[detector]` settings (a review: 7 of 20 fault files
    against 8). `--config` counts them as that device would."""
    base = ["evaluate", str(DEMO_BUNDLE), "--normal", *map(str, NORMAL_FILES), "--anomalous",
            str(ANOMALOUS_FILE), str(DEMO_CLIP)]  # fmt: skip
    plain = cli(*base)
    threshold = load_bundle(DEMO_BUNDLE).threshold
    assert f"files with an event at threshold {threshold:.4g}" in plain.stdout
    assert "anomalous 2/2" in plain.stdout, plain.stdout
    config = tmp_path / "c.toml"
    config.write_text("[detector]\nthreshold = 1000.0\n")
    deaf = cli(*base, "--config", str(config))
    assert "files with an event at threshold 1000" in deaf.stdout
    assert "anomalous 0/2" in deaf.stdout, deaf.stdout
    config.write_text("[detector]\ntrigger_windows = 0\n")
    bad = cli(*base, "--config", str(config), check=False)
    assert bad.returncode == 1 and "detector.trigger_windows" in bad.stderr, bad.stderr


def test_evaluate_checks_its_timeline_file_before_scoring(tmp_path: Path) -> None:
    """A typo in --timeline used to surface after every file had been scored."""
    base = ["evaluate", str(DEMO_BUNDLE), "--normal", str(NORMAL_FILES[0]), "--anomalous",
            str(ANOMALOUS_FILE)]  # fmt: skip
    missing = tmp_path / "typo.wav"
    proc = cli(*base, "--report", str(tmp_path / "rep"), "--timeline", str(missing), check=False)
    assert proc.returncode == 1 and proc.stdout == ""  # nothing scored, nothing printed
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"soundsentry: error: {missing}: no such file or folder"
    )
    assert not (tmp_path / "rep").exists()
    proc = cli(*base, "--timeline", str(ANOMALOUS_FILE), check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1] == (
        "soundsentry: error: --timeline draws into the report: give --report DIR too"
    )


def test_a_classifier_refuses_a_false_alarm_budget(tmp_path: Path) -> None:
    """A classifier has no threshold to set: the budget was accepted and ignored."""
    classes = tmp_path / "classes"
    for name, path in (("a", NORMAL_FILES[0]), ("b", NORMAL_FILES[1])):
        (classes / name).mkdir(parents=True)
        (classes / name / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "c.bundle"
    proc = cli("train", "--classes", str(classes), "--out", str(out),
               "--false-alarms-per-day", "5", check=False)  # fmt: skip
    assert proc.returncode == 1 and not out.exists(), proc.stderr
    assert "a classifier (--classes) has none" in proc.stderr.strip().splitlines()[-1]


def test_class_folders_name_what_is_left_out_and_every_bad_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An empty class folder and recordings beside the class folders were dropped without a
    word, and bad files were named one at a time (after TensorFlow had loaded)."""
    import soundfile as sf

    from edge.errors import AudioError
    from train.dataset import class_folders

    root = tmp_path / "classes"
    for name, path in (("bearing", NORMAL_FILES[0]), ("normal", NORMAL_FILES[1])):
        (root / name).mkdir(parents=True)
        (root / name / path.name).write_bytes(path.read_bytes())
    (root / "belt_slip").mkdir()
    (root / "loose.flac").write_bytes(NORMAL_FILES[2].read_bytes())
    (root / "normal" / "z-copy.flac").write_bytes(NORMAL_FILES[1].read_bytes())
    groups = class_folders(root)
    assert {k: [f.name for f in v] for k, v in groups.items()} == {
        "bearing": [NORMAL_FILES[0].name],
        "normal": [NORMAL_FILES[1].name],  # its copy used once
    }
    assert "belt_slip holds no audio: it is not a class" in caplog.text
    (root / "normal" / "z-mislabelled.flac").write_bytes(NORMAL_FILES[0].read_bytes())
    assert [f.name for f in class_folders(root)["normal"]] == [NORMAL_FILES[1].name]
    assert "normal/z-mislabelled.flac is a copy of" in caplog.text  # one recording, two classes
    (root / "normal" / "z-mislabelled.flac").unlink()
    assert f"1 recording(s) directly in {root} belong to no class" in caplog.text
    (root / "bearing" / "corrupt.wav").write_bytes(b"RIFF\0\0\0\0WAVEjunk")
    sf.write(root / "normal" / "8k.wav", np.zeros(8000 * 12) + 0.01, 8000)
    with pytest.raises(AudioError) as bad:
        class_folders(root, samplerate=16000)
    assert (
        "2 of" in str(bad.value) and "corrupt.wav" in str(bad.value) and "8k.wav" in str(bad.value)
    )


def test_specaugment_masks_a_classifiers_copies_and_leaves_its_originals() -> None:
    """`train --classes --augment specaugment` made copies identical to the originals: only the
    autoencoder applied the masks."""
    from train.augment import Augmenter

    rng = np.random.default_rng(0)
    x = rng.normal(-40, 5, (6, 30, 64)).astype(np.float32)
    y = np.arange(6) % 2
    xs, ys = Augmenter(("specaugment",), 1).labelled_copies(x, y, np.random.default_rng(1))
    assert xs.shape == (12, 30, 64) and list(ys) == [*y, *y]
    np.testing.assert_array_equal(xs[:6], x)  # the originals as they were
    assert all(not np.array_equal(xs[6 + i], x[i]) for i in range(6))  # every copy masked


def test_evaluate_scores_only_the_windows_the_device_judges(tmp_path: Path) -> None:
    """Two seconds of digital silence before a normal recording (a recorder's lead-in) scored
    hundreds in the file's mean (215 against a threshold of 1.87) and took the AUC from 1.000
    to 0.909, though the device takes no evidence from silence and its event counts agreed."""
    from edge.audio_io import read_audio

    led_in, plain = tmp_path / "normal-led-in.wav", tmp_path / "normal.wav"
    audio = np.concatenate([read_audio(f, 16000) for f in NORMAL_FILES])  # 20 s
    sf.write(plain, audio, 16000)
    # (the device judges nothing in the settle time after silence: 5 s of the 20 are not scored)
    sf.write(led_in, np.concatenate([np.zeros(2 * 16000, np.float32), audio]), 16000)
    reports = {}
    for name, normal in (("plain", plain), ("led-in", led_in)):
        out = tmp_path / f"{name}.json"
        proc = cli("evaluate", str(DEMO_BUNDLE), "--normal", str(normal),
                   "--anomalous", str(ANOMALOUS_FILE), "--json", str(out))  # fmt: skip
        reports[name] = json.loads(out.read_text())
    whole, led = (reports[k]["items"][0]["score"] for k in ("plain", "led-in"))
    assert led < 2 * whole, (led, whole)
    assert "left out of the scores" in proc.stderr


def test_the_report_s_timeline_is_the_device_s_and_its_variant_s(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timeline plotted every window's raw score, a dropout's 20 times the threshold among
    them, which the device never takes as evidence; and `--float`'s was the int8 model's."""
    import edge.audio_io as audio_module
    import soundsentry.report as report_module
    from train.evaluate import device_events, evaluate

    real = audio_module.sha256_file
    audio_module._digest_of.cache_clear()  # files other tests hashed in this process

    rate = load_bundle(tiny_bundle).features.samplerate
    fault = read_audio(ANOMALOUS_FILE, rate)
    dropout = tmp_path / "dropout.wav"
    sf.write(dropout, np.concatenate([fault[: 2 * rate], np.zeros(rate), fault[2 * rate :]]),
             rate, subtype="FLOAT")  # fmt: skip
    drawn = {}
    monkeypatch.setattr(report_module, "_timeline", lambda *a: drawn.update(args=a) or a[-1])
    monkeypatch.setattr(
        report_module, "write_report", lambda r, f, t: report_module._timeline(t, f)
    )
    hashed: list[Path] = []
    monkeypatch.setattr(audio_module, "sha256_file", lambda p: hashed.append(p) or real(p))
    normal = [str(f) for f in NORMAL_FILES]
    floats = evaluate(tiny_bundle, normal, [str(dropout)], variant="float")
    report_module.write_full_report(floats, tiny_bundle, normal, [str(dropout)], tmp_path / "r")
    # each file hashed once, for the copy check and the trained-on check of both variants
    assert sorted(map(str, hashed)) == sorted({str(Path(f).resolve()) for f in [*normal, dropout]})
    line = drawn["args"][0]
    name, scores, threshold = line.name, line.scores, line.threshold
    assert name == "dropout.wav (float)"
    float_bundle = load_bundle(tiny_bundle, variant="float")
    expected, _, _ = device_events(read_audio(dropout, rate), float_bundle)
    np.testing.assert_allclose(scores, expected)
    assert np.isnan(scores).sum() >= 2 and threshold == float_bundle.threshold


def test_evaluate_refuses_a_copy_given_as_both_and_names_what_it_cannot_check(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A copy of a fault given as normal was scored on both sides (AUC 0.916, no word); a
    bundle without file hashes could not be checked for its own training audio, silently; a
    file no whole segment of which is scored left the AUC without a word. (A silent file
    leaves the AUC but stays in the files with an event: the device reports nothing on it.)"""
    from edge.errors import AudioError
    from train.evaluate import evaluate

    normal = tmp_path / "normal"
    normal.mkdir()
    shutil.copy(ANOMALOUS_FILE, normal / "copy.flac")
    with pytest.raises(AudioError, match=r"is a copy of .*copy\.flac \(normal\)"):
        evaluate(DEMO_BUNDLE, [str(normal)], [str(ANOMALOUS_FILE)])
    (normal / "copy.flac").unlink()
    for f in NORMAL_FILES:
        shutil.copy(f, normal / f.name)
    sf.write(normal / "silent.wav", np.zeros(5 * 16000, np.float32), 16000)
    report = evaluate(DEMO_BUNDLE, [str(normal)], [str(ANOMALOUS_FILE)])
    assert report.normal_files_with_event == f"0/{len(NORMAL_FILES) + 1}"  # what it reports
    said = [r.getMessage() for r in caplog.records]
    assert any("records no hash of its training files" in m for m in said), said
    for name in ("short.wav", "short-2.wav"):
        sf.write(normal / name, read_audio(NORMAL_FILES[0], 16000)[: 2 * 16000], 16000)
    caplog.clear()
    evaluate(DEMO_BUNDLE, [str(normal)], [str(ANOMALOUS_FILE)], segment=3.0)
    said = [r.getMessage() for r in caplog.records if "segment" in r.getMessage()]
    assert len(said) == 1, said  # one line for them all (30 lines and then an error, once)
    assert said[0].startswith("2 file(s) hold no whole 3-s segment"), said
    assert "short-2.wav" in said[0] and "short.wav" in said[0], said


def test_the_one_session_advice_counts_record_s_chunks_as_one_session() -> None:
    """Ten minutes recorded by `record` are ten 60-s files of one sitting: the advice to record
    at other times too was given for one file of ten minutes, never for them."""
    from edge.advice import advice, sessions_of

    chunks = [(f"/site/pump/20261203T081500-{i:04d}.wav", None) for i in range(10)]
    assert sessions_of(chunks) == 1
    assert sessions_of([*chunks, ("/site/pump/20261204T090000-0000.wav", None), ("a", None)]) == 3
    assert sessions_of([("take1.wav", "ab"), ("take1.wav", "cd")]) == 2, "two states, by content"
    said = advice(600.0, 10, {}, sessions=sessions_of(chunks))
    assert any(x.startswith("advice: all the audio is one session (10 files)") for x in said)
    assert not any("one session" in x for x in advice(600.0, 10, {}, sessions=2))


@pytest.mark.parametrize("fit", [fit_bank, fit_statistics])
def test_a_flat_float32_feature_gets_the_whole_spread_floor(fit: Callable[..., Any]) -> None:
    """float32 features floored in float32 gave 0.0099999998, under the floor the loader
    holds training to (knn refused the bundle)."""
    rng = np.random.default_rng(0)
    f = rng.normal(size=(40, 6)).astype(np.float32)
    f[:, 2] = 1.5  # a feature that never moves
    assert np.all(fit(f).std >= MIN_FEATURE_STD)


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_out_of_range_is_a_one_line_usage_error(tmp_path: Path, seed: str) -> None:
    """NumPy and TensorFlow take seeds from 0 to 2**32 - 1; others ended in a traceback once
    TensorFlow had loaded."""
    out = tmp_path / "m.bundle"
    proc = cli("train", "--normal", *map(str, NORMAL_FILES), "--detector", "autoencoder",
               "--seed", seed, "--out", str(out), check=False)  # fmt: skip
    assert proc.returncode == 1 and "argument --seed: must be" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()
