"""`soundsentry train --detector embedding`: a compact CNN learns, from normal audio alone, an
embedding of 1-s log-mel windows in which the user's machine is compact; the edge scores the
int8 embedding with a numpy Mahalanobis head (`edge/detectors/embedding.py`).

Self-supervised tasks, none of which needs a fault recording (outlier exposure):
- which machine: the user's machine against a small corpus of other machines' normal sound
  (`train/corpus/`, MIMII, CC BY-SA 4.0), with one class per corpus machine;
- which state, when the normal audio comes in state folders (`--normal-states DIR`): each
  state is its own class of the same head, so states stay apart in the embedding. A folder
  named `off` holds the place with the machine stopped (neighbours, ventilation): it trains the
  network, and the edge calls the machine off when it hears it, but it takes no part in the
  Mahalanobis head, the threshold or the running level (`OwnAudio.running`);
- which augmentation was applied to the window: none, a time stretch (the frame axis
  resampled), a pitch shift (the mel axis shifted) or a level modulation of a band range
  (what imbalance or a loose part does), on the user's and the corpus windows.
A machine that runs faster or slower, or whose tones move, looks like an augmented window:
the embedding has to keep exactly the detail that such faults change.

The network is a temporal CNN with energy pooling (`build_embedding_net`): the embedding is
each mel band's log energy through a few learnt filters along time.

The network up to its embedding layer is exported as full-integer int8 TFLite; the numpy head
(standardise, Ledoit-Wolf Mahalanobis: `train.fluctuation.fit_statistics`) is fitted on the
int8 embeddings, so `calibrate` refits it without TensorFlow.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from edge.audio_io import read_each
from edge.bundle import MODEL_FLOAT, MODEL_INT8, write_bundle
from edge.detectors.embedding import (
    BAND_STD_FLOOR_DB,
    EmbeddingScorer,
    band_levels,
    network_input,
)
from edge.errors import AudioError
from edge.features import FeatureParams, LogMel
from edge.health import heard_pieces
from edge.machine_state import OFF, evidence_windows, machine_profile
from edge.runtime import TfliteModel
from edge.threshold import DEFAULT_FALSE_ALARMS_PER_DAY, RULE, score_stats
from train.dataset import (
    FLUCTUATION_HOP_DIVISOR,
    Holdout,
    dense_params,
    holdout_split,
    require_held_out,
    state_folders,
    threshold_from_holdout,
    training_audio,
    warn_dead,
)
from train.fluctuation import fit_statistics
from train.progress import progress
from train.quantize import to_float_tflite, to_int8_tflite
from train.states import frames_of, warn_not_apart, warn_off_near
from train.statistics import ALL_CHANNELS, channel_views
from train.trainer import LEARNING_RATE, STD_FLOOR_DB, base_manifest

log = logging.getLogger(__name__)

ARCHITECTURE = "cnn-embedding-v2"
CORPUS_FILE = Path(__file__).resolve().parent / "corpus" / "mimii_normal_logmel.npz"
DEFAULT_EPOCHS = 12
EPOCH_WINDOWS_PER_SECOND = 32
EPOCH_WINDOWS = (1024, 4096)
"""Windows drawn per epoch, half the user's machine and half the corpus: 32 per second of the
user's training audio within these bounds. Fresh windows every epoch, so a short recording is
not drilled into the network 12 x 4096 times, and 10 min of audio costs no more per epoch
than ~2 min (the budget: 5 min of training on 2 cores)."""
BATCH_SIZE = 64
RELATIVE_STD_FLOOR = 0.5
"""Least spread of an embedding dimension in the head, as a share of the median dimension's
(variance flooring, as in Gaussian mixture models). It does not bind on full-band audio (the
MIMII fan's figures are identical at 0, 0.25 and 0.5); on audio with empty bands, whose outputs
sit still in training, it took a threshold from 1674 to 24.7."""
TEMPORAL_KERNELS = np.array([[0, -1, 1], [-1, 2, -1], [-1, 0, 1], [1, -1, 0]], np.float32)
"""Starting taps of the learnt filters along time, shared by every band: first differences,
a second difference and a centred difference (how a band changes from frame to frame, the
statistic that separates faults best on the fan). Training reshapes them."""
ENERGY_FLOOR = 1e-2
"""Added to a band's filtered energy before the logarithm (input in normal spreads)."""
HIDDEN = 64
"""Units of the task heads' shared layer (training only; the edge runs up to the embedding)."""
AUGMENTATIONS = ("none", "stretch", "pitch", "modulation")
STRETCH = (1.15, 1.4)
"""Time-stretch factors (and their inverses): clearly off the machine's own tempo."""
PITCH_BANDS = (1, 3)
"""Mel-band shifts of the pitch class (one band is ~5 % in frequency above 1 kHz)."""
MOD_CYCLES = (0.5, 12.0)
"""Level-modulation cycles per window (about Hz, for a 1-s window)."""
MOD_DEPTH_DB = (1.0, 4.0)
"""Peak level change of the modulation class, dB: within the frame-to-frame spread of most
machine sound, so that only a network that knows the normal fluctuation can tell."""
SUBFRAME_P = 0.5
"""Share of windows read at a random sub-frame offset (interpolated), every class alike, so
that interpolation smoothing cannot tell the stretched class apart."""
EDGE_FILL_P = 0.3
"""Share of un-shifted windows whose edge bands get the pitch class's edge fill, so that the
repeated edge rows cannot tell the shifted class apart."""
OWN_SHARE = 0.5
REPRESENTATIVE = 600
"""Windows (the user's, all augmentations) the int8 calibrator sees: their range is wider than
normal running's, which leaves a fault's larger values room before int8 saturates (calibrated on
the running windows as recorded, sliders lost 0.2 of clip AUC: bench/SELECTION.md)."""


# --- the corpus of other machines --------------------------------------------------------------


@dataclass
class Corpus:
    """Other machines' normal sound: log-mel frame sequences and their machine names."""

    sequences: list[np.ndarray]
    machines: list[str]
    sources: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        """The distinct machines, sorted."""
        return sorted(set(self.machines))


def machine_key(name: str) -> str:
    """'pump_id04', 'pump/id_04' and 'Pump-ID_04' all name the same machine."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def load_corpus(
    params: FeatureParams, exclude: Iterable[str] = (), path: Path = CORPUS_FILE
) -> Corpus:
    """The corpus without the `exclude`d machines (type + id); refuses other features."""
    with np.load(path, allow_pickle=False) as npz:
        stored = json.loads(str(npz["features"]))
        frames, starts = npz["frames"], npz["starts"]
        machines, sources = [str(m) for m in npz["machines"]], [str(s) for s in npz["sources"]]
    mine = params.to_dict()
    spectral = [k for k in stored if k not in ("window_seconds", "hop_seconds")]
    if any(stored[k] != mine[k] for k in spectral):
        raise AudioError(f"{path.name} holds features {stored}; this training uses {mine}")
    known = {machine_key(m) for m in machines}
    drop = {machine_key(e) for e in exclude}
    if drop - known:
        raise ValueError(
            f"exclude names no corpus machine: {sorted(drop - known)} (known: "
            f"{', '.join(sorted(set(machines)))})"
        )
    keep = [i for i, m in enumerate(machines) if machine_key(m) not in drop]
    return Corpus(
        [frames[starts[i] : starts[i + 1]].astype(np.float32) for i in keep],
        [machines[i] for i in keep],
        [sources[i] for i in keep],
    )


SAME_CLIP_DB = 0.1
"""Mean absolute difference (dB) of the first frames below which a recording is a corpus
clip (the same clip re-encoded, as FLAC or 16-bit, differs by 0.01)."""
SAME_CLIP_FRAMES = 16


def corpus_machines_heard(own: OwnAudio, corpus: Corpus, params: FeatureParams) -> list[str]:
    """The corpus machines one of whose clips is among the user's recordings (someone trying
    SoundSentry on MIMII or DCASE files): trained against itself as another machine, the
    network is asked to tell identical windows apart."""
    logmel = LogMel(params)
    span = params.n_fft + (SAME_CLIP_FRAMES - 1) * params.hop_length
    heads = [logmel(a[:span]) for a in own.audio if len(a) >= span]
    found = set()
    for seq, machine in zip(corpus.sequences, corpus.machines, strict=True):
        if machine in found or len(seq) < SAME_CLIP_FRAMES:
            continue
        first = seq[:SAME_CLIP_FRAMES]
        if any(np.mean(np.abs(h - first)) < SAME_CLIP_DB for h in heads):
            found.add(machine)
    return sorted(found)


# --- the user's audio --------------------------------------------------------------------------


@dataclass
class OwnAudio:
    """The user's normal audio, per state: frames to train on, windows to fit and to hold out."""

    states: list[str]
    train_frames: list[tuple[int, np.ndarray]] = field(default_factory=list)
    held_frames: list[tuple[int, np.ndarray]] = field(default_factory=list)
    fit_windows: list[np.ndarray] = field(default_factory=list)
    held_windows: list[np.ndarray] = field(default_factory=list)
    holdouts: dict[str, Holdout] = field(default_factory=dict)
    seconds: float = 0.0
    """Seconds of recordings fitted (a multichannel recording counts once, not per view)."""
    held_seconds: float = 0.0
    running_held_seconds: float = 0.0
    """Held-out seconds outside the `off` state: what backs the threshold."""
    view_seconds: float = 0.0
    """Seconds fitted over every view (what an epoch draws from)."""
    audio: list[np.ndarray] = field(default_factory=list)
    """Every recording, for the machine's running level."""
    state_seconds: dict[str, float] = field(default_factory=dict)
    """Seconds of recordings per state (a multichannel recording counts once)."""
    state_recordings: dict[str, int] = field(default_factory=dict)
    """Recordings per state (a multichannel recording counts once)."""
    view_states: list[int] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    """The manifest's `machine` section from the running states' audio (`machine_profile`)."""
    named: bool = False
    """The states are the user's folders (`--normal-states`), which the edge names even when
    there is only one; plain `--normal` audio is one unnamed state."""
    """The state of each recording (each view), in the order of `audio` and the window lists."""

    def running(self, parts: list[np.ndarray]) -> list[np.ndarray]:
        """The entries of a per-recording list (`audio`, `fit_windows`, `held_windows`) whose
        state is not `off`: a state folder of that name is what the place sounds like with the
        machine stopped, which the edge names `off` and never scores for faults, so it takes no
        part in the head, the threshold or the machine's running level. It still trains the
        network, as a state to tell apart."""
        return [p for p, i in zip(parts, self.view_states, strict=True) if self.states[i] != OFF]

    def state_levels(self) -> dict[str, np.ndarray]:
        """With named states: each state's mean log-mel band levels (dB), by which the edge
        names the state the machine runs in."""
        if not self.named and len(self.states) < 2:
            return {}
        levels = [
            np.concatenate([f for label, f in self.train_frames if label == i]).mean(axis=0)
            for i in range(len(self.states))
        ]
        return {"machine.state_levels": np.stack(levels)}


def _warn_off_near(own: OwnAudio) -> None:
    """Say which running state lies so near `off` in level that the edge may take it for off."""
    levels = own.state_levels().get("machine.state_levels")
    if levels is not None:
        warn_off_near(levels, own.states)


def _warn_states_not_apart(own: OwnAudio) -> None:
    """Say which state folders the edge cannot tell apart by their level spectrum."""
    levels = own.state_levels().get("machine.state_levels")
    if levels is None:
        return
    windows: dict[int, list[np.ndarray]] = {}
    for label, w in zip(own.view_states, own.held_windows, strict=True):
        windows.setdefault(label, []).append(w)
    warn_not_apart(levels, own.states, {i: np.concatenate(p) for i, p in windows.items()})


_View = tuple[int, str, Path, int, np.ndarray]
"""One view of a recording: its state's label, the state, the path, the channel view, audio."""


def _read_views(
    own: OwnAudio,
    groups: dict[str, list[Path]],
    params: FeatureParams,
    channel: int,
    all_channels: bool,
) -> list[_View]:
    """Every view of every state's recordings, each state split by `holdout_split`."""
    views = []
    for label, (state, files) in enumerate(groups.items()):
        own.holdouts[state] = holdout_split(files)
        own.state_recordings[state] = len(files)
        read = read_each(  # every file found unusable in reading named at once
            files,
            lambda path: channel_views(path, params, channel, all_channels),
            progress(files, f"reading {state}"),
        )
        views += [
            (label, state, path, view, audio)
            for path, audio_views in zip(files, read, strict=True)
            for view, audio in enumerate(audio_views)
        ]
    return views


def _add_features(
    own: OwnAudio, views: list[_View], params: FeatureParams, logmel: LogMel, dense: FeatureParams
) -> None:
    """Each view's frames and windows, fitted and held out, and the seconds they hold."""
    dropout = params.hop_length  # the device's dead-window rule (`edge.health.is_dead`)
    off = own.machine.get("off_below_dbfs")  # windows below it the device calls `off`
    for label, state, path, view, audio in progress(views, "features"):
        fit_audio, held_audio = own.holdouts[state].parts(path, audio, params.window_samples)
        # frame sequences without a dropout's frames of nothing (which the device never
        # scores): they would widen the standardisation and train the tasks on them
        for part, out in ((fit_audio, own.train_frames), (held_audio, own.held_frames)):
            out += [(label, frames_of(a, logmel)) for a in heard_pieces(part, dropout)]
        # the windows the device scores, as every trainer takes them (and the ensemble
        # lines its members' held-out scores up window by window); the `off` state's are
        # below the off level by design and are left out of the head by `running`
        level = None if state == OFF else off
        own.fit_windows.append(evidence_windows(fit_audio, dense, level))
        own.held_windows.append(evidence_windows(held_audio, params, level))
        own.view_seconds += len(fit_audio) / params.samplerate
        if view == 0:  # the seconds of the recording, not of its channels
            own.state_seconds[state] = (
                own.state_seconds.get(state, 0.0) + len(audio) / params.samplerate
            )
            own.seconds += len(fit_audio) / params.samplerate
            own.held_seconds += len(held_audio) / params.samplerate
            if state != OFF:
                own.running_held_seconds += len(held_audio) / params.samplerate


def _require_running(own: OwnAudio, params: FeatureParams) -> None:
    """Refuse audio with no window of the machine running to fit or to hold out."""
    if not sum(len(w) for w in own.running(own.fit_windows)):
        raise AudioError(
            f"not enough audio of the machine running to train: need at least "
            f"{params.window_seconds} s outside a state folder named `{OFF}`"
        )
    require_held_out(sum(len(w) for w in own.running(own.held_windows)), params)


def _warn_not_held_out(own: OwnAudio, params: FeatureParams) -> None:
    """Say which running state has no held-out window."""
    held = dict.fromkeys(own.states, 0)
    for label, windows in zip(own.view_states, own.held_windows, strict=True):
        held[own.states[label]] += len(windows)
    for state, n in held.items():
        if n == 0 and state != OFF:
            log.warning(
                "state %s: none of its audio could be held out (%d recording(s) too short for "
                "their last fifth to hold a window): the threshold is set without it, and it may "
                "raise false alarms while the machine runs in it; give it 5 or more recordings, "
                "or recordings of at least %g s",
                state, own.state_recordings[state], 5 * params.window_seconds,
            )  # fmt: skip


def read_own(
    groups: dict[str, list[Path]],
    params: FeatureParams,
    channel: int,
    all_channels: bool = False,
    named_states: bool = True,
) -> OwnAudio:
    """Frames and windows of every state's recordings, split by `holdout_split` per state; with
    `all_channels` every channel of a recording is a view of it (held out together);
    `named_states`: the groups are the user's state folders (not `--normal`'s one group)."""
    own = OwnAudio(list(groups))
    logmel, dense = LogMel(params), dense_params(params, FLUCTUATION_HOP_DIVISOR)
    views = _read_views(own, groups, params, channel, all_channels)
    warn_dead(((path, audio) for _, state, path, _, audio in views if state != OFF), params)
    own.audio = [audio for *_, audio in views]
    own.view_states = [label for label, *_ in views]
    own.machine = machine_profile(
        own.running(own.audio), params, groups=own.running(own.view_states),
        names=own.states if named_states else None,  # `normal` is no folder of the user's
    )  # fmt: skip
    _add_features(own, views, params, logmel, dense)
    _require_running(own, params)
    _warn_not_held_out(own, params)
    _warn_states_not_apart(own)  # before the minutes of training, not after
    _warn_off_near(own)
    return own


# --- the self-supervised tasks -----------------------------------------------------------------


def augment_window(
    seq: np.ndarray, frames: int, aug: int, rng: np.random.Generator
) -> np.ndarray | None:
    """One window of `frames` frames from a frame sequence with augmentation `aug` (an index
    of AUGMENTATIONS); None when the sequence is too short for it."""
    rate = 1.0
    if AUGMENTATIONS[aug] == "stretch":
        rate = float(np.exp(rng.uniform(*np.log(STRETCH)))) ** rng.choice((-1, 1))
    window = cut_window(seq, frames, rate, rng.uniform() < SUBFRAME_P or rate != 1.0, rng)
    if window is None:
        return None
    if AUGMENTATIONS[aug] == "pitch":
        k = int(rng.integers(*PITCH_BANDS, endpoint=True))
        return shift_bands(window, k * int(rng.choice((-1, 1))))
    if AUGMENTATIONS[aug] == "modulation":
        window = modulate(window, rng)
    if rng.uniform() < EDGE_FILL_P:
        k = int(rng.integers(*PITCH_BANDS, endpoint=True))
        return fill_edge(window, k if rng.uniform() < 0.5 else -k)
    return window


def cut_window(
    seq: np.ndarray, frames: int, rate: float, subframe: bool, rng: np.random.Generator
) -> np.ndarray | None:
    """`frames` frames read every `rate` frames from a random place of `seq` (linear
    interpolation; at a random sub-frame offset if `subframe`); None if `seq` is too short."""
    offset = rng.uniform() if subframe else 0.0
    room = len(seq) - 1 - frames * rate - offset
    if room < 0:
        return None
    pos = rng.uniform(0, room) // 1 + offset + np.arange(frames) * rate
    i0 = pos.astype(np.int64)
    w = (pos - i0)[:, None]
    return seq[i0] * (1 - w) + seq[np.minimum(i0 + 1, len(seq) - 1)] * w


def modulate(window: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A sinusoidal level modulation of a random band range (what imbalance, loose parts or
    a beating tone do to a machine): MOD_DEPTH_DB deep, MOD_CYCLES per window."""
    frames, mels = window.shape
    width = int(rng.integers(mels // 4, mels + 1))
    lo = int(rng.integers(0, mels - width + 1))
    cycles, depth = rng.uniform(*MOD_CYCLES), rng.uniform(*MOD_DEPTH_DB)
    t = np.arange(frames) / frames
    out = window.copy()
    out[:, lo : lo + width] += (depth * np.sin(2 * np.pi * (cycles * t + rng.uniform())))[:, None]
    return out


def shift_bands(window: np.ndarray, k: int) -> np.ndarray:
    """Shift along the mel axis by k bands (up if k > 0); vacated bands repeat the edge."""
    out = np.roll(window, k, axis=1)
    return fill_edge(out, k)


def fill_edge(window: np.ndarray, k: int) -> np.ndarray:
    """The k lowest bands (k > 0) or -k highest bands (k < 0) repeat their inner neighbour."""
    out = window.copy()
    if k > 0:
        out[:, :k] = out[:, k : k + 1]
    elif k < 0:
        out[:, k:] = out[:, k - 1 : k]
    return out


class TaskSampler:
    """Draws training windows with their machine/state and augmentation labels."""

    def __init__(
        self, own: list[tuple[int, np.ndarray]], n_states: int, corpus: Corpus, frames: int
    ) -> None:
        self.frames = frames
        names = corpus.names
        need = int(np.ceil(frames * STRETCH[1])) + 2
        pool = [(label, s) for label, s in own if len(s) >= need]
        pool += [
            (n_states + names.index(m), s)
            for m, s in zip(corpus.machines, corpus.sequences, strict=True)
            if len(s) >= need
        ]
        if not any(label < n_states for label, _ in pool):
            raise AudioError(f"need recordings of at least {need * 0.032:.1f} s to train")
        self.labels = np.array([label for label, _ in pool])
        self.sequences = [s for _, s in pool]
        self.n_states = n_states
        self.n_classes = n_states + len(names)

    def _weights(self, own: bool) -> np.ndarray:
        """Pick probabilities: by length within a class, each state or machine alike."""
        lengths = np.array([len(s) for s in self.sequences], np.float64)
        mask = (self.labels < self.n_states) == own
        w = np.where(mask, lengths, 0.0)
        for c in np.unique(self.labels[mask]):
            w[self.labels == c] /= w[self.labels == c].sum()
        return w / w.sum()

    def draw(
        self, n: int, rng: np.random.Generator, own_share: float = OWN_SHARE
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """n windows (n, frames, mels), their class and their augmentation label."""
        n_own = round(n * own_share) if own_share < 1 else n
        picks = [rng.choice(len(self.sequences), n_own, p=self._weights(True))]
        if n > n_own:
            picks.append(rng.choice(len(self.sequences), n - n_own, p=self._weights(False)))
        x, y, a = [], [], []
        for i in np.concatenate(picks):
            aug = int(rng.integers(len(AUGMENTATIONS)))
            w = augment_window(self.sequences[i], self.frames, aug, rng)
            if w is None:
                aug, w = 0, augment_window(self.sequences[i], self.frames, 0, rng)
            x.append(w)
            y.append(self.labels[i])
            a.append(aug)
        return np.stack(x).astype(np.float32), np.array(y), np.array(a)


def epoch_size(seconds: float) -> int:
    """Windows drawn per epoch for `seconds` of the user's training audio."""
    low, high = EPOCH_WINDOWS
    return int(np.clip(round(seconds * EPOCH_WINDOWS_PER_SECOND), low, high))


# --- the network ---------------------------------------------------------------------------------


def build_embedding_net(frames: int, mels: int, n_classes: int) -> tuple[keras.Model, keras.Model]:
    """(training model with the machine/state and augmentation heads, embedding model).

    A temporal CNN with energy pooling: learnt filters along time (3 taps, shared by every mel
    band, started as frame differences) run over the standardised log-mel window, and each
    band's mean filtered energy, in log, is the embedding (bands x filters). It keeps where in
    frequency a change happens and how fast the band moves, which is where imbalance, rubbing or
    a loose part show. Frame differences cancel level offsets; the learnt filters need not (a
    microphone 6 dB louder changes which fan faults it reports, bench/shifts.md), and filters
    held to zero sum, which do cancel them, scored lower over the four machine types
    (bench/results.md). The self-supervised heads sit on top of the embedding, so everything
    they learn goes through it. Chosen on the fan split among four variants (bench/results.md).
    """
    inp = keras.Input((frames, mels, 1), name="logmel")
    taps, filters = TEMPORAL_KERNELS.shape[1], len(TEMPORAL_KERNELS)
    kernel = TEMPORAL_KERNELS.T.reshape(taps, 1, 1, filters)
    kernel = kernel + 0.01 * np.arange(filters, dtype=np.float32)  # distinct starts
    x = layers.Conv2D(
        filters,
        (taps, 1),
        use_bias=False,
        name="temporal_filters",
        kernel_initializer=keras.initializers.Constant(kernel),
    )(inp)
    energy = layers.AveragePooling2D((frames - taps + 1, 1))(layers.Multiply()([x, x]))
    log_energy = layers.Lambda(lambda e: keras.ops.log(e + ENERGY_FLOOR), name="log")(energy)
    emb = layers.Reshape((mels * filters,), name="embedding")(log_energy)
    h = layers.Dense(HIDDEN, activation="relu")(layers.BatchNormalization()(emb))
    machine = layers.Dense(n_classes, activation="softmax", name="machine")(h)
    aug = layers.Dense(len(AUGMENTATIONS), activation="softmax", name="augmentation")(h)
    return keras.Model(inp, [machine, aug], name="embedding-tasks"), keras.Model(
        inp, emb, name=ARCHITECTURE
    )


def fit_network(
    sampler: TaskSampler,
    mean: np.ndarray,
    std: np.ndarray,
    epochs: int,
    epoch_windows: int,
    rng: np.random.Generator,
) -> tuple[keras.Model, keras.Model, dict[str, float]]:
    """Train on freshly drawn windows every epoch; returns both models and the last losses."""
    tasks, embed = build_embedding_net(sampler.frames, len(mean), sampler.n_classes)
    tasks.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss=["sparse_categorical_crossentropy"] * 2,
        metrics=[["accuracy"], ["accuracy"]],
    )
    history: dict[str, float] = {}
    for epoch in range(epochs):
        x, y, a = sampler.draw(epoch_windows, rng)
        h = tasks.fit(
            network_input(x, mean, std)[..., None],
            (y, a),
            batch_size=BATCH_SIZE,
            epochs=epoch + 1,
            initial_epoch=epoch,
            shuffle=True,
            verbose=0,
        )
        history = {k: round(float(v[-1]), 4) for k, v in h.history.items()}
        # one line per epoch, with the total: one fit per epoch makes Keras print "1/1"
        losses = ", ".join(f"{k} {v:.3g}" for k, v in history.items() if k.endswith("loss"))
        print(f"epoch {epoch + 1}/{epochs}: {losses}", flush=True)
    return tasks, embed, history


def task_accuracy(
    tasks: keras.Model,
    sampler: TaskSampler,
    mean: np.ndarray,
    std: np.ndarray,
    n: int,
    rng: np.random.Generator,
) -> dict[str, float]:
    """Accuracy of both heads on windows drawn from `sampler` (held-out audio)."""
    x, y, a = sampler.draw(n, rng, own_share=1.0)
    machine, aug = tasks.predict(network_input(x, mean, std)[..., None], verbose=0)
    return {
        "state_accuracy": round(float((machine.argmax(axis=1) == y).mean()), 4),
        "augmentation_accuracy": round(float((aug.argmax(axis=1) == a).mean()), 4),
        "windows": int(n),
    }


@dataclass
class TrainedTasks:
    """The task network after training, with what its input was standardised by."""

    tasks: keras.Model
    embed: keras.Model
    history: dict[str, float]
    sampler: TaskSampler
    mean: np.ndarray
    std: np.ndarray


def fit_tasks(
    own: OwnAudio,
    corpus: Corpus,
    params: FeatureParams,
    epochs: int,
    epoch_windows: int,
    rng: np.random.Generator,
) -> TrainedTasks:
    """Standardise by the user's training frames of the machine running and train the task
    network on them against the corpus (bench/id_head.py scores with its machine head the same
    way). An `off` state stays out of the standardisation: a neighbour's bursts or a hiss 30 dB
    down widened the spreads sevenfold, the running windows fell into a few int8 steps and
    unseen normal running raised an event (a review's reproduction)."""
    sampler = TaskSampler(own.train_frames, len(own.states), corpus, params.n_frames)
    frames = np.concatenate([f for label, f in own.train_frames if own.states[label] != OFF])
    mean = frames.mean(axis=0)
    std = np.maximum(frames.std(axis=0), STD_FLOOR_DB)
    tasks, embed, history = fit_network(sampler, mean, std, epochs, epoch_windows, rng)
    return TrainedTasks(tasks, embed, history, sampler, mean, std)


# --- the whole training --------------------------------------------------------------------------


def _representative(sampler: TaskSampler, own: OwnAudio, rng: np.random.Generator) -> np.ndarray:
    """The windows the int8 converter sets its ranges by: the user's own, augmented as in
    training, of the machine running (the edge never scores `off`; its windows set the input's
    range as they set the standardisation)."""
    off = [i for i, name in enumerate(own.states) if name == OFF]
    x, y, _ = sampler.draw(REPRESENTATIVE * (2 if off else 1), rng, own_share=1.0)
    return x[~np.isin(y, off)][:REPRESENTATIVE]


def train_embedding(normal: Sequence[str | Path] | None, out: str | Path, **options: Any) -> Path:
    """Train on normal audio and write an `embedding` bundle; returns its path (the options
    and what they do: `fit_embedding`)."""
    return fit_embedding(normal, out, **options)[0]


def _state_groups(
    normal: Sequence[str | Path] | None,
    states: str | Path | dict[str, list[Path]] | None,
    params: FeatureParams,
    channel: int,
) -> dict[str, list[Path]]:
    """The recordings by state: the state folders' (found when not given as a dict), or the
    normal audio as one state `normal`."""
    return (
        (
            states
            if isinstance(states, dict)
            else state_folders(states, params.samplerate, params.window_seconds, channel)
        )
        if states
        else {
            "normal": training_audio(
                list(normal or []), params.samplerate, params.window_seconds, channel
            )
        }
    )


def _corpus_for(
    own: OwnAudio, params: FeatureParams, exclude: Iterable[str], corpus_path: Path
) -> Corpus:
    """The corpus without `exclude` and without the machines the user's recordings are of."""
    corpus = load_corpus(params, exclude, corpus_path)
    mine = corpus_machines_heard(own, corpus, params)
    if mine:  # a machine cannot be told apart from itself
        log.info("corpus: %s left out: the recordings are of it", ", ".join(mine))
        corpus = load_corpus(params, [*exclude, *mine], corpus_path)
    log.info(
        "corpus: %d clips of %d machines (%s)",
        len(corpus.machines),
        len(corpus.names),
        ", ".join(corpus.names),
    )
    return corpus


def _validation_record(
    trained: TrainedTasks,
    own: OwnAudio,
    corpus: Corpus,
    rng: np.random.Generator,
    epoch_windows: int,
    named: bool,
) -> dict:
    """The manifest's `validation`: the tasks' held-out accuracy, the last epoch, and with
    `named` states how much of each state there was."""
    tasks, history = trained.tasks, trained.history
    sampler, mean, std = trained.sampler, trained.mean, trained.std
    validation = _validation(tasks, own, corpus, sampler, mean, std, rng) | {
        "last_epoch": history,
        "epoch_windows": epoch_windows,
    }
    if named:  # for the summary: how much of each state there was
        validation["state_seconds"] = {k: round(v, 1) for k, v in own.state_seconds.items()}
        validation["state_recordings"] = dict(own.state_recordings)
    return validation


def _int8_and_head(
    trained: TrainedTasks,
    own: OwnAudio,
    params: FeatureParams,
    false_alarms_per_day: float,
    seed: int,
    rng: np.random.Generator,
) -> tuple[bytes, TfliteModel, Head]:
    """The int8 embedding network and the head fitted on its embeddings."""
    embed, sampler, mean, std = trained.embed, trained.sampler, trained.mean, trained.std
    rep = _representative(sampler, own, rng)
    int8 = to_int8_tflite(embed, network_input(rep, mean, std)[..., None], seed)
    model = TfliteModel(int8, name="int8 embedding")
    try:
        head = _fit_head(model, own, mean, std, params, false_alarms_per_day)
    except AudioError:  # a steady, tonal machine: the augmented windows' range left its own
        # running a step or two of int8, and every embedding came out the same
        log.warning(
            "the int8 embedding did not vary over this machine's steady sound: quantised "
            "again on its running windows as recorded (a fault far outside them saturates)"
        )
        plain = np.concatenate(own.running(own.fit_windows))
        rep = plain[rng.choice(len(plain), min(REPRESENTATIVE, len(plain)), replace=False)]
        int8 = to_int8_tflite(embed, network_input(rep, mean, std)[..., None], seed)
        model = TfliteModel(int8, name="int8 embedding")
        head = _fit_head(model, own, mean, std, params, false_alarms_per_day)
    return int8, model, head


def fit_embedding(
    normal: Sequence[str | Path] | None,
    out: str | Path,
    states: str | Path | dict[str, list[Path]] | None = None,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    channel: int = 0,
    params: FeatureParams | None = None,
    false_alarms_per_day: float = DEFAULT_FALSE_ALARMS_PER_DAY,
    exclude: Iterable[str] = (),
    epoch_windows: int | None = None,
    corpus_path: Path = CORPUS_FILE,
    all_channels: bool = False,
) -> tuple[Path, np.ndarray]:
    """Train on normal audio (`normal` files/folders, or `states`: one subfolder per state) and
    write an `embedding` bundle; `exclude` keeps corpus machines (type + id) out;
    `all_channels` trains on every channel of multichannel recordings as a view. Returns the
    bundle's path and the held-out normal scores its threshold came from (an ensemble puts the
    network on its common scale with them)."""
    params = params or FeatureParams()
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(seed)
    groups = _state_groups(normal, states, params, channel)
    own = read_own(groups, params, channel, all_channels, named_states=bool(states))
    own.named = bool(states)
    corpus = _corpus_for(own, params, exclude, corpus_path)
    epoch_windows = epoch_windows or epoch_size(own.view_seconds)
    trained = fit_tasks(own, corpus, params, epochs, epoch_windows, rng)
    validation = _validation_record(trained, own, corpus, rng, epoch_windows, bool(states))
    int8, model, head = _int8_and_head(trained, own, params, false_alarms_per_day, seed, rng)
    views_of = ALL_CHANNELS if all_channels else channel
    manifest = _manifest(
        Path(out), params, own, model, int8, head, validation, epochs, seed, views_of,
        trained.embed.count_params()
    )  # fmt: skip
    files = {MODEL_INT8: int8, MODEL_FLOAT: to_float_tflite(trained.embed)}
    write_bundle(out, manifest, files, head.arrays | own.state_levels())
    log.info(
        "wrote %s (int8 embedding %.1f KB, threshold %.4g)", out, len(int8) / 1024, head.threshold
    )
    return Path(out), head.held_scores


def _validation(
    tasks: keras.Model,
    own: OwnAudio,
    corpus: Corpus,
    train_sampler: TaskSampler,
    mean: np.ndarray,
    std: np.ndarray,
    rng: np.random.Generator,
) -> dict:
    """Held-out accuracy of the self-supervised tasks (a training-side check, no fault audio)."""
    held = [(label, f) for label, f in own.held_frames if len(f)]
    try:
        sampler = TaskSampler(held, len(own.states), corpus, train_sampler.frames)
    except AudioError:
        return {"states": own.states, "corpus_machines": corpus.names}
    acc = task_accuracy(tasks, sampler, mean, std, 512, rng)
    return {"states": own.states, "corpus_machines": corpus.names, "held_out": acc}


@dataclass
class Head:
    """The numpy head fitted on int8 embeddings, its threshold and the arrays to ship."""

    threshold: float
    rule_params: dict
    held_scores: np.ndarray
    arrays: dict[str, np.ndarray]


def std_floor(embeddings: np.ndarray, step: float) -> float:
    """The least spread an embedding dimension is given in the head: one int8 output step
    (the resolution it is known to), and at least RELATIVE_STD_FLOOR of the median dimension's.
    An output that sits still in training (the energy of a band the recordings leave empty)
    would otherwise turn the first sound in that band, a door in the held-out audio, into a
    distance in the thousands, and the threshold into one no fault reaches."""
    typical = float(np.median(embeddings.std(axis=0))) if len(embeddings) > 1 else 0.0
    return max(step, RELATIVE_STD_FLOOR * typical)


def _fit_head(
    model: TfliteModel,
    own: OwnAudio,
    mean: np.ndarray,
    std: np.ndarray,
    params: FeatureParams,
    false_alarms_per_day: float,
) -> Head:
    """The head, fitted on the embeddings of the fit part, scores the held-out audio (the
    threshold) and ships, so the threshold belongs to the scorer the device runs. A head
    refitted on all the embeddings (as the numpy kinds do with their features, which are not
    fitted) shipped before: the network was trained on the fit part, and the held-out
    embeddings widened the refitted head, under which unheard audio scored lower than under the
    head that set the threshold (the MIMII fan's normal test clips peaked at 3.32 against 3.78
    under this one; bench/SELECTION.md, 2026-12-03)."""
    fit_w = np.concatenate(own.running(own.fit_windows))
    held_w = np.concatenate(own.running(own.held_windows))
    levels = band_levels(fit_w)
    band_mean, band_std = levels.mean(axis=0), np.maximum(levels.std(axis=0), BAND_STD_FLOOR_DB)
    probe = EmbeddingScorer(model, mean, std, None, band_mean, band_std)
    fit_e, held_e = probe.embed_many(fit_w), probe.embed_many(held_w)
    floor = std_floor(fit_e, float(model.output_quant.scale) if model.output_quant else 0.0)
    held_scores = fit_statistics(fit_e, std_floor=floor).distance(held_e)
    views = len(own.audio) > sum(own.state_recordings.values())  # channels scored as views
    value, rule_params = threshold_from_holdout(
        held_scores, false_alarms_per_day, params.hop_seconds,
        own.running_held_seconds if views else None,
        [len(w) for w in own.running(own.held_windows)],
    )  # fmt: skip
    rule_params["note"] = "threshold from held-out audio scored by the head, fitted without it"
    final = fit_statistics(fit_e, std_floor=floor)
    band_error = np.stack([probe.band_deviation(w) for w in held_w])
    arrays = {
        "statistics.feature_mean": final.mean,
        "statistics.feature_std": final.std,
        "statistics.center": final.center,
        "statistics.precision": final.precision,
        "normalization.mean": mean,
        "normalization.std": std,
        "band_level.mean": band_mean,
        "band_level.std": band_std,
        "normal_band_error.mean": band_error.mean(axis=0),
        "normal_band_error.std": band_error.std(axis=0),
    }
    return Head(value, rule_params, held_scores, arrays)


def _manifest(
    out: Path,
    params: FeatureParams,
    own: OwnAudio,
    model: TfliteModel,
    int8: bytes,
    head: Head,
    validation: dict,
    epochs: int,
    seed: int,
    channel: int,
    n_params: int,
) -> dict:
    """The embedding bundle's manifest (arrays travel separately)."""
    mean, std = head.arrays["normalization.mean"], head.arrays["normalization.std"]
    manifest = base_manifest(out, params, mean, std, model, int8)
    fit_files = [f for h in own.holdouts.values() for f in h.fit_names]
    held_files = [f for h in own.holdouts.values() for f in h.held_names]
    return manifest | {
        "kind": "embedding",
        "score": "embedding-mahalanobis",
        "output": {
            "shape": list(model.output_shape),
            "dtype": str(model.output_dtype),
            "scale": model.output_quant.scale if model.output_quant else None,
            "zero_point": model.output_quant.zero_point if model.output_quant else None,
        },
        "statistics": {"feature": f"{ARCHITECTURE}-{model.output_size}"},
        "threshold": {"value": head.threshold, "rule": RULE, "params": head.rule_params},
        "normal_scores": score_stats(head.held_scores, "held-out normal audio"),
        "machine": own.machine  # each state's own median level
        | {"states": own.states if own.named or len(own.states) > 1 else None},
        "validation": validation,
        "training": {
            "files": fit_files,
            "seconds": round(own.seconds + own.held_seconds, 3),  # all of it, as every kind
            # the network and the shipped head saw the fit part only (_fit_head)
            "fitted_seconds": round(own.seconds, 3),
            "holdout_files": held_files,
            "holdout_seconds": round(own.held_seconds, 3),
            "channel": channel,
            "epochs": epochs,
            "seed": seed,
            "architecture": ARCHITECTURE,
            "parameters": int(n_params),
        },
    }
