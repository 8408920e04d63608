"""`soundsentry calibrate`: adapt a trained bundle to where it is installed, from a few minutes
(or less) of normal audio recorded there, without retraining the network and with numpy only.

It refits what the score depends on besides the network: the per-band normalisation of the
features (a microphone moved, another gain, another room), the held-out score statistics,
the per-band error reference, the threshold from the false-alarm budget, and the machine's
running level, from which the edge tells `off`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from edge.advice import require_audio, warn_short
from edge.audio_io import (
    check_files,
    file_digest,
    find_audio,
    first_few,
    read_audio,
    read_each,
    without_copies,
)
from edge.bundle import (
    Bundle,
    channel_for,
    load_bundle,
    sha256_bytes,
    write_bundle,
)
from edge.detectors.base import DetectorKind
from edge.detectors.registry import plugin_for
from edge.errors import AudioError, BundleError
from edge.features import FeatureParams, LogMel
from edge.framing import cut
from edge.health import is_dead, level_dbfs
from edge.learning import FEATURIZERS, calibration_summary
from edge.machine_state import (
    OFF,
    PERCENTILES,
    QUIET_GAP_DB,
    StateNamer,
    evidence_windows,
    level_split,
    machine_profile,
)
from edge.threshold import check_site_varies

log = logging.getLogger(__name__)

STATE_LEVELS = "machine.state_levels"
"""Each trained state's mean band levels (dB), by which the edge names the state it hears."""
MIN_RUNNING_SHARE = 0.05
"""The machine's running windows in the site audio are at least this share of them: rarer loud
windows (a door, a dropped tool) are not taken for the machine."""
SHIFT_STEP_DB = 0.25
MATCH_DB = 0.5
"""A shift matches when the site's running median lies this close to the trained one moved."""
GAIN_SPREAD_DB = 1.5
"""Window gains this close to a centre count towards its density (_state_shift)."""
PEAK_STEPS = int(GAIN_SPREAD_DB / SHIFT_STEP_DB)
"""A density peak is the highest within this many steps either side."""
MAX_SHIFT_DB = 60.0
"""The furthest a site's level is looked for from training's."""
SHIFTS = np.arange(-MAX_SHIFT_DB, MAX_SHIFT_DB + SHIFT_STEP_DB / 2, SHIFT_STEP_DB)
"""The shifts (dB) both estimators try (_level_shift, _state_shift)."""
LEVEL_SHIFT_DB = 6.0
"""A running level this far from training's is worth a line (the microphone moved, another
gain): the calibrated bundle's off level follows the site."""


def calibrate_bundle(
    model: str | Path,
    normal: list[str | Path],
    out: str | Path,
    false_alarms_per_day: float | None = None,
    channel: int | None = None,
) -> Path:
    """Write a calibrated copy of `model` to `out`; return its path. `channel`: by default the
    one the model was fitted on."""
    bundle = load_bundle(model)
    channel = channel_for(bundle.manifest, channel, "calibrate")
    p = bundle.features
    files = find_audio(normal)
    if not files:
        raise AudioError("no audio files found in " + " ".join(str(x) for x in normal))
    # every unusable file named at once; a mono file (what `record` writes, from the channel
    # the service listens on) is read whatever channel the model was fitted on
    check_files(files, max(channel, 0), p.samplerate, mono_any=True)
    files = without_copies(files)  # a copy would be scored by a model that holds it
    _check_not_trained_on(bundle, files)
    audio = read_each(  # every file found unusable in reading named at once
        files,
        lambda f: read_audio(
            f, p.samplerate, channel, need_sound=True, mono_any=True,
            offset_matters=p.carries_dc,
        ),
    )  # fmt: skip
    files, audio = _windowed(files, audio, p)
    machine, shift = _site_machine(bundle, audio)
    off_like = _off_state_levels(bundle, shift)
    if shift is not None:  # before the refit: the threshold is set on what the device will run
        bundle = _inputs_moved(bundle, shift)
    per_file, kept = _running_windows(audio, p, machine.get("off_below_dbfs"), off_like)
    # the audio the refit stands on: the machine running, not the room while it was off
    seconds = kept * sum(len(a) for a in audio) / p.samplerate
    del audio  # the windows are all the refit needs: an hour's audio is 0.23 GB more at its peak
    require_audio(seconds, "calibrate")  # below the minimum: refused, saying how much more
    refit = plugin_for(bundle.manifest).refit(bundle, per_file, false_alarms_per_day)
    _check_varies(bundle, refit.manifest)
    arrays = {**bundle.arrays, **refit.arrays}
    if bundle.manifest.kind in FEATURIZERS:  # its refits on site are backed by this audio
        arrays |= calibration_summary(bundle, per_file)
    if shift is not None and STATE_LEVELS in arrays:  # absolute dB, like the off level
        arrays[STATE_LEVELS] = (arrays[STATE_LEVELS] + shift).astype(arrays[STATE_LEVELS].dtype)
    manifest = bundle.manifest.model_dump(exclude={"files", "checksum", "arrays"})
    manifest |= refit.manifest
    manifest["machine"] = machine
    manifest["calibration"] = {"channel": channel}  # _write adds the rest of the provenance
    return _write(bundle, manifest, arrays, files, seconds, out)


def _check_not_trained_on(bundle: Bundle, files: list[Path]) -> None:
    """Warn of site audio that is the model's own training audio: scored by a model fitted on
    it, it sets the threshold too low, and new normal running alarms (a valve calibrated on two
    of its training clips: threshold 2.475 -> 1.125, and both of its other normal clips raised
    events, without a word, in a review). By content, as `evaluate` checks its files."""
    fitted = bundle.fitted_hashes()
    if not fitted:
        return
    trained = [path for path in files if file_digest(path) in fitted]  # hashed for the copies
    if not trained:
        return
    log.warning(
        "%s: the model was fitted on %s, so %s low and set%s the threshold too low (new normal "
        "running would alarm): calibrate on normal audio recorded at the site, not trained on",
        first_few(str(f) for f in trained),
        "all of it" if len(trained) == len(files) else f"{len(trained)} of {len(files)} files",
        "it scores" if len(trained) == 1 else "they score",
        "s" if len(trained) == 1 else "",
    )


def check_calibratable(model: str | Path) -> None:
    """Refuse at once (BundleError, one line) what `calibrate` would refuse only after reading
    and scoring all the audio: a kind with nothing to refit. An `out` that is the model itself
    is calibrated in place: the bundle is read whole before the new one is swapped in, and the
    one it replaces is kept as `OUT.prev` (it was refused from the days before bundles were
    written atomically, and a user on the device had to invent a second path and move it)."""
    bundle = load_bundle(model)
    plugin = plugin_for(bundle.manifest)
    if type(plugin).refit is DetectorKind.refit:  # the base's: nothing on site to refit
        raise BundleError(f"a {plugin.kind} detector cannot be refitted on site")


def _windowed(
    files: list[Path], audio: list[np.ndarray], params: FeatureParams
) -> tuple[list[Path], list[np.ndarray]]:
    """The recordings that hold at least one window; the others are named in a warning (they
    would count towards the minimum of audio without giving the threshold a single window)."""
    short = [str(f) for f, a in zip(files, audio, strict=True) if len(a) < params.window_samples]
    warn_short(short, params.window_seconds)
    keep = [i for i, a in enumerate(audio) if len(a) >= params.window_samples]
    return [files[i] for i in keep], [audio[i] for i in keep]


def _check_varies(bundle: Bundle, refit: dict) -> None:
    """Refuse a refit whose held-out normal windows score far below the training's
    (`check_site_varies`)."""
    site = refit.get("normal_scores", {}).get("p50")
    if site is not None:
        check_site_varies(site, bundle.manifest.normal_scores.p50)


NORMALIZATION_MEAN = "normalization.mean"


def _inputs_moved(bundle: Bundle, shift: float) -> Bundle:
    """The bundle with its network's input standardisation moved by the site's level (dB): an
    int8 CNN at a site 10 dB louder, or with the microphone moved away, was fed inputs offset
    by about four of a band's spreads, which its filters do not cancel (on the fan, clip AUC
    0.89 after calibrating at the training's level, 0.86 at +10 dB and 0.69 at -10 dB, in a
    review; the same at every gain once moved). A kind whose refit standardises anew (the
    autoencoder) replaces it anyway; an ensemble's member carries its prefix."""
    arrays = {
        name: (a + shift).astype(a.dtype)
        if name == NORMALIZATION_MEAN or name.endswith("." + NORMALIZATION_MEAN)
        else a
        for name, a in bundle.arrays.items()
    }
    return replace(bundle, arrays=arrays)


def _off_state_levels(bundle: Bundle, shift: float | None) -> StateNamer | None:
    """A bundle trained with a state folder `off`: the namer of its states with their band
    levels as heard here (moved with the machine's level); None without one."""
    trained = bundle.manifest.machine
    if trained is None or OFF not in (trained.states or []) or STATE_LEVELS not in bundle.arrays:
        return None
    return StateNamer(list(trained.states), bundle.arrays[STATE_LEVELS] + (shift or 0.0))


def _running_windows(
    audio: list[np.ndarray],
    params: FeatureParams,
    off_below_dbfs: float | None,
    off_like: StateNamer | None = None,
) -> tuple[list[np.ndarray], float]:
    """Each recording's window features that training would take as normal running
    (`evidence_windows`): without silence or a dropout, the machine off (below the site's off
    level), starting up or coasting to a stop, the STOP_SECONDS before it is heard going quiet,
    and windows nearest the state `off` of a bundle trained with one; and the share kept. A
    site recording with the machine stopped for a while set the threshold on the empty room too
    (with an `off` state, in a review: the threshold 63 % up, no fault window above it), and
    one stop and start in each site recording (1.5 s down, 3 s off, 1.5 s up) lifted a
    `levels` threshold 25-fold while every window of the stop was above the off level only for
    a moment (in a review, before calibrate left out what training does)."""
    per_file, dropped, total = [], 0, 0
    for a in audio:
        kept = evidence_windows(a, params, off_below_dbfs, off_like)
        windows = params.windows_in(len(a))
        per_file.append(kept)
        total += windows
        dropped += windows - len(kept)
    if dropped:
        log.warning(
            "%d of %d windows are silent, the machine off (below %s dBFS%s), starting or "
            "stopping: the calibration leaves them out, as training does", dropped, total,
            off_below_dbfs, ", or sounding like the state `off`" if off_like is not None else "",
        )  # fmt: skip
    return per_file, (total - dropped) / max(total, 1)


def _site_machine(bundle: Bundle, audio: list[np.ndarray]) -> tuple[dict, float | None]:
    """The machine's running level as heard here (a microphone moved away or another gain
    moves it; the off level trained elsewhere would call the running machine `off`), with
    the states the bundle was trained on, and how far it moved (None: the bundle recorded no
    levels to compare with); a shift of LEVEL_SHIFT_DB or more is said."""
    trained = bundle.manifest.machine
    states = trained.states if trained is not None else None
    shifted = _shifted_profile(bundle, audio)
    if shifted is None:
        _warn_two_levels(audio, bundle.features)
    site, shift = shifted or (
        machine_profile(audio, bundle.features, states, say_two_levels=False),
        None,
    )
    before = trained.running_level_dbfs.get("p50") if trained is not None else None
    after = site["running_level_dbfs"].get("p50")
    if before is not None and after is not None and abs(after - before) >= LEVEL_SHIFT_DB:
        trained_off = trained.off_below_dbfs if trained is not None else None
        # a gain or a microphone moved away, or the machine off: its level cannot tell which
        # (a field review calibrated on the empty room, 27 dB down, and every normal clip raised
        # an event after it), but the trained model would have called all of it `off`
        off = trained_off is not None and after < trained_off
        log.warning(
            "the machine runs %.0f dB %s here than in training (median window %.1f dBFS, "
            "trained %.1f): its off level moves with it, to %.1f dBFS%s",
            abs(after - before), "louder" if after > before else "quieter", after, before,
            site["off_below_dbfs"],
            f"; the model as trained takes most of this audio for the machine off (below "
            f"{trained_off:.1f} dBFS): if it was off while this was recorded, do not use this "
            "bundle (it would take the silence for running): record the machine running"
            if off else "",
        )  # fmt: skip
    return site, shift


def _window_levels(audio: list[np.ndarray], p: FeatureParams) -> np.ndarray:
    """The level (dBFS) of every window of the recordings the device scores, sorted."""
    return np.sort([
        level_dbfs(w.samples)
        for a in audio
        for w in cut(a, p.window_samples, p.hop_samples)
        if not is_dead(w.samples, p.hop_length)
    ])  # fmt: skip


def _warn_two_levels(audio: list[np.ndarray], p: FeatureParams) -> None:
    """A bundle that recorded no running level learns it from the site audio, all of it: with
    the machine stopped for a good part of the recording the empty room is counted as running
    and its off level falls below the room. Two levels far apart, each a good share of the
    windows, are said (Otsu's split of the window levels)."""
    split = level_split(_window_levels(audio, p))
    if split is not None and split[1] - split[0] >= QUIET_GAP_DB:
        low, high, share = split
        log.warning(
            "the recordings hold two levels %.0f dB apart (%.0f %% of the windows near %.0f dBFS, "
            "the rest near %.0f): if the machine was off in the quieter part, record it running "
            "only; this bundle has no running level of its own to tell them apart, so both "
            "count as running and the off level falls below the quieter one",
            high - low, 100 * share, low, high,
        )  # fmt: skip


def _shifted_profile(bundle: Bundle, audio: list[np.ndarray]) -> tuple[dict, float] | None:
    """The trained machine profile moved by how much louder or quieter the machine runs here,
    and that shift (dB). The shift s is the one at which the site's windows above the moved
    off level have the trained median level moved by s (the machine's running, heard here),
    among the shifts that keep at least MIN_RUNNING_SHARE of the windows. Where several match
    (within MATCH_DB), the one nearest no shift: with the machine stopped for most of the
    recording the empty room matches too, far down, and with loud transients in it (a door, a
    neighbour's machine) they match too, far up. So a quiet state of the training (idle) stays
    running, the off level stays above the empty room, and transients are not taken for the
    machine (matched on the site's 99th percentile, one burst a minute 20 dB up called the
    machine itself `off`). A site where the room is as loud as the machine was in training
    and the machine far louder would fool it: the warning on a shift says so. A bundle trained
    with state folders takes the shift from its states instead (_state_shift). None for a
    bundle that recorded no levels (machine_profile measures them here instead)."""
    trained, p = bundle.manifest.machine, bundle.features
    median = trained.running_level_dbfs.get("p50") if trained is not None else None
    if trained is None or trained.off_below_dbfs is None or median is None:
        return None
    levels = _window_levels(audio, p)
    if not len(levels):
        return None
    shift = _state_shift(bundle, audio) if STATE_LEVELS in bundle.arrays else None
    if shift is None:
        shift = _level_shift(levels, trained.off_below_dbfs, median)
    if shift is None:
        return None
    running = levels[np.searchsorted(levels, trained.off_below_dbfs + shift) :]
    if not len(running):
        return None
    profile = {
        "running_level_dbfs": {
            k: round(float(np.percentile(running, q)), 2) for k, q in PERCENTILES.items()
        },
        "off_below_dbfs": round(trained.off_below_dbfs + shift, 2),
        "states": trained.states,
    }
    return profile, shift


def _level_shift(levels: np.ndarray, off: float, median: float) -> float | None:
    """The shift of _shifted_profile from sorted window levels: roots of the median match,
    grouped where they lie side by side (one root spans a few steps), the group nearest no
    shift, the best match in it."""
    shifts = SHIFTS
    starts = np.searchsorted(levels, off + shifts)  # first running window at each shift
    kept = len(levels) - starts
    usable = kept >= max(MIN_RUNNING_SHARE * len(levels), 1)
    if not usable.any():
        return None
    mismatch = np.full(len(shifts), np.inf)
    for i in np.flatnonzero(usable):
        mismatch[i] = abs(float(np.median(levels[starts[i] :])) - (median + shifts[i]))
    roots = np.flatnonzero(mismatch <= MATCH_DB)
    if not len(roots):
        return float(shifts[int(np.argmin(mismatch))])
    groups = np.split(roots, np.flatnonzero(np.diff(roots) > 1) + 1)
    nearest = min(groups, key=lambda g: float(np.min(np.abs(shifts[g]))))
    return float(shifts[nearest[int(np.argmin(mismatch[nearest]))]])


def _state_shift(bundle: Bundle, audio: list[np.ndarray]) -> float | None:
    """The level shift of a bundle trained with state folders, from its states' band levels:
    each window's gain to the state whose band levels it matches best after a gain (its shape),
    windows nearest a state named `off` left out; the shift is the middle of the densest group
    of gains nearest no shift (at least MIN_RUNNING_SHARE of the windows). The overall running
    median mixes the states, so a site that runs them in another mix matched it at a shift
    (+9.5 dB with the same microphone); each window measured against its own state does not."""
    trained, p = bundle.manifest.machine, bundle.features
    states = list(trained.states or []) if trained is not None else []
    levels = bundle.array(STATE_LEVELS)
    if len(states) != len(levels):
        return None
    logmel = LogMel(p)
    gains = []
    for a in audio:
        for w in cut(a, p.window_samples, p.hop_samples):
            if is_dead(w.samples, p.hop_length):
                continue
            apart = logmel(w.samples).mean(axis=0)[None, :] - levels
            gain = apart.mean(axis=1)
            k = int(np.argmin(np.sqrt(((apart - gain[:, None]) ** 2).mean(axis=1))))
            if states[k] != OFF:
                gains.append(float(gain[k]))
    if not gains:
        return None
    values = np.array(gains)
    centres = SHIFTS
    near = np.abs(values[None, :] - centres[:, None]) <= GAIN_SPREAD_DB
    density = near.sum(axis=1)
    enough = density >= max(MIN_RUNNING_SHARE * len(values), 1)
    if not enough.any():
        return None
    peaks = [
        i
        for i in np.flatnonzero(enough)
        if density[i] >= density[max(i - PEAK_STEPS, 0) : i + PEAK_STEPS + 1].max()
    ]
    centre = centres[min(peaks, key=lambda i: abs(centres[i]))]
    return float(np.median(values[np.abs(values - centre) <= 2 * GAIN_SPREAD_DB]))


def _write(
    bundle: Bundle,
    manifest: dict,
    arrays: dict[str, np.ndarray],
    files: list[Path],
    seconds: float,
    out: str | Path,
) -> Path:
    """Write the calibrated bundle with provenance and a new model id."""
    m = bundle.manifest
    manifest |= {
        "calibration": {
            **(manifest.get("calibration") or {}),
            "from_model": m.model_id,
            "files": [str(f) for f in files],
            "seconds": round(seconds, 3),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        },
    }
    contents = {n: bundle.file_bytes(n) for n in m.files if n.endswith(".tflite")}
    base = m.model_id.split("-cal-")[0]
    salt = b"".join(a.tobytes() for _, a in sorted(arrays.items()))
    salt += json.dumps(manifest, sort_keys=True, default=str).encode()
    manifest["model_id"] = f"{base}-cal-{sha256_bytes(salt)[:8]}"
    out = Path(out)
    write_bundle(out, manifest, contents, arrays)
    log.info(
        "calibrated %s on %.0f s of audio: threshold %.4g -> %.4g",
        m.model_id,
        seconds,
        m.threshold.value,
        manifest["threshold"]["value"],
    )
    return out
