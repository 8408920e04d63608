"""Operating states from state folders (`train --normal-states DIR`), for every trainer: each
state's mean log-mel level spectrum, by which the edge names the state the machine runs in
(`edge.machine_state.StateNamer`), and what training says of states the edge could not tell
apart, or from `off`. numpy only: the statistics kinds train with states on a Pi."""

from __future__ import annotations

import logging
import math

import numpy as np

from edge.features import FeatureParams, LogMel
from edge.health import heard_pieces
from edge.machine_state import OFF, StateNamer

log = logging.getLogger(__name__)

STATE_LEVELS = "machine.state_levels"
"""The bundle array of each state's mean log-mel band levels (edge.machine_state.state_namer)."""
FRAME_CHUNK = 4096
"""STFT frames computed at a time when turning long recordings into frames."""


def frames_of(audio: np.ndarray, logmel: LogMel) -> np.ndarray:
    """Continuous log-mel frames of a signal (every hop_length samples), computed in chunks."""
    p = logmel.params
    n = 0 if len(audio) < p.n_fft else 1 + (len(audio) - p.n_fft) // p.hop_length
    out = np.zeros((n, p.n_mels), np.float32)
    for first in range(0, n, FRAME_CHUNK):
        last = min(n, first + FRAME_CHUNK)
        chunk = audio[first * p.hop_length : (last - 1) * p.hop_length + p.n_fft]
        out[first:last] = logmel(chunk)
    return out


STATES_APART = 0.8
"""The least share of a state's held-out windows that must lie nearest its own mean band levels,
as the edge names states (`edge.machine_state.StateNamer`, which needs 8 of the last 10 windows
to name one), before `train` warns that the states' level spectra do not tell it apart."""


def states_not_apart(
    levels: np.ndarray, names: list[str], windows: dict[int, np.ndarray]
) -> list[tuple[str, float, str]]:
    """The states the edge would name wrongly: for each state `i` of `names` whose held-out
    log-mel windows (`windows[i]`, (n, frames, mels)) lie nearest its own band levels
    (`levels[i]`) less than STATES_APART of the time, (its name, that share, the state the
    others lie nearest most often)."""
    found, namer = [], StateNamer(names, levels)
    for i, w in windows.items():
        if not len(w):
            continue
        nearest = namer.nearest_of(w.mean(axis=1))  # as the edge names them
        share = float(np.mean(nearest == i))
        if share < STATES_APART:
            others = np.bincount(nearest[nearest != i], minlength=len(names))
            found.append((names[i], share, names[int(np.argmax(others))]))
    return found


OFF_MARGIN_DB = 6.0
"""A running state heard fewer dB than this quieter (or louder) than in its recordings, and
lying nearer `off` then, is warned of at training (`off_margins`)."""


def off_margins(levels: np.ndarray, names: list[str]) -> list[tuple[str, float, str]]:
    """For each running state, how far its whole level spectrum may move (a microphone moved,
    a gain changed, a fault that quietens or loudens the machine) before the edge names it
    `off` and judges none of it: (name, dB, "quieter" or "louder"), the uniform shift at which
    it lies as near `off`'s band levels as its own. Empty without a state `off`. A review's
    `off` (a neighbour's pump, 7 dB louder than the fan) took the fan 4.5 dB louder for the
    machine off, its faults with it; one 3 dB quieter than the fan, the fan 3.7 dB quieter."""
    if OFF not in names:
        return []
    off = levels[names.index(OFF)]
    found = []
    for name, own in zip(names, levels, strict=True):
        if name == OFF:
            continue
        apart = own - off  # |apart + d| = |d| at the uniform shift d = -|apart|^2 / (2 sum)
        total = float(apart.sum())
        shift = float(apart @ apart) / (2 * abs(total)) if total else math.inf
        found.append((name, shift, "quieter" if total > 0 else "louder"))
    return found


def warn_off_near(levels: np.ndarray, names: list[str]) -> None:
    """Say which running state lies so near `off` in level that a small change of level at the
    site would make the edge take the machine for off, deaf to its faults (OFF_MARGIN_DB)."""
    for state, shift, way in off_margins(levels, names):
        if shift < OFF_MARGIN_DB:
            log.warning(
                "state %s heard %.1f dB %s than in its recordings lies nearer `%s` than itself: "
                "the edge would take the machine for off and judge none of it (a microphone "
                "moved, a gain changed, a fault that makes it %s); record `%s` as the place "
                "sounds with this machine stopped, or leave that folder out (the level alone "
                "then tells the machine off)",
                state, shift, way, OFF, way, OFF,
            )  # fmt: skip


def warn_not_apart(levels: np.ndarray, names: list[str], held: dict[int, np.ndarray]) -> None:
    """Say which state folders the edge cannot tell apart by their level spectrum (`held`: each
    state's held-out log-mel windows): it would name one as another in state messages and
    events (a field test's two speeds of one fan, 10 % apart, were named by the recording's
    level drift instead)."""
    for state, share, other in states_not_apart(levels, names, held):
        log.warning(
            "state %s: only %.0f %% of its held-out audio lies nearest its own level spectrum "
            "(the rest mostly nearest %s's); the edge names states by that spectrum and may "
            "call this state `%s`: record each state where its sound differs in level or "
            "balance, or put such folders together",
            state, 100 * share, other, other,
        )  # fmt: skip


class StateLevels:
    """Each state's mean log-mel band levels (dB) over its recordings' frames, summed as they
    are read: what the edge names states by."""

    def __init__(self, names: list[str], params: FeatureParams) -> None:
        self.names, self.params, self.logmel = names, params, LogMel(params)
        self.sums = np.zeros((len(names), params.n_mels))
        self.counts = np.zeros(len(names))

    def add(self, label: int, audio: np.ndarray) -> None:
        """The frames of one recording of state `label`, without a dropout's frames of nothing
        (which the device never scores)."""
        for piece in heard_pieces(audio, self.params.hop_length):
            frames = frames_of(piece, self.logmel)
            self.sums[label] += frames.sum(axis=0)
            self.counts[label] += len(frames)

    def levels(self) -> np.ndarray:
        """(states, mels): each state's mean band levels."""
        return (self.sums / np.maximum(self.counts, 1)[:, None]).astype(np.float32)
