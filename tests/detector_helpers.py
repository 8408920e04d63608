"""What several tests need around a Detector: a sink that keeps what it reports, and a bundle's
windows of a file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edge.bundle
from edge.audio_io import read_audio
from edge.bundle import load_bundle, write_bundle
from edge.commands import ReplyTo
from edge.errors import BundleError
from edge.features import windows_of
from edge.messages import (
    EventMessage,
    HealthMessage,
    MetricsMessage,
    ResponseMessage,
    StateMessage,
)
from edge.scoring import Scorer
from edge.sink import Sink


class Recorder(Sink):
    """Keeps everything the detector reports."""

    def __init__(self) -> None:
        self.events: list[EventMessage] = []
        self.states: list[StateMessage] = []
        self.healths: list[HealthMessage] = []
        self.metrics_sent: list[MetricsMessage] = []
        self.responses: list[ResponseMessage] = []
        self.reply_tos: list[ReplyTo | None] = []
        """Where each response's command asked for it (its MQTT 5 Response Topic)."""

    def event(self, message: EventMessage) -> None:
        self.events.append(message)

    def state(self, message: StateMessage) -> None:
        self.states.append(message)

    def health(self, message: HealthMessage) -> None:
        self.healths.append(message)

    def metrics(self, message: MetricsMessage) -> None:
        self.metrics_sent.append(message)

    def response(self, message: ResponseMessage, reply_to: ReplyTo | None = None) -> None:
        self.responses.append(message)
        self.reply_tos.append(reply_to)

    def kinds(self) -> list[str]:
        return [e.type for e in self.events]


def bundle_windows(bundle_path: Path, audio_file: Path) -> np.ndarray:
    """The edge's log-mel windows of a file, for a bundle's features."""
    p = load_bundle(bundle_path).features
    return windows_of(read_audio(audio_file, p.samplerate), p)


def window_scores(bundle_path: Path, audio_file: Path) -> np.ndarray:
    """Window scores of a file by a bundle, one window at a time as the daemon scores."""
    scorer = Scorer.from_bundle(load_bundle(bundle_path))
    return np.array([scorer.score(x).score for x in bundle_windows(bundle_path, audio_file)])


def write_unchecked(out: Path, manifest: dict, files: dict, arrays: dict) -> Path:
    """`write_bundle` without its last check (that the written bundle loads): how a test makes
    a bundle the loader must refuse, as a damaged disk or an older version would leave it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(edge.bundle, "_check_loads", lambda folder, path: None)
        return write_bundle(out, manifest, files, arrays)


def with_arrays(bundle_path: Path, out: Path, check: bool = True, **arrays: np.ndarray) -> Path:
    """A copy of a bundle with some arrays replaced (names with '.' passed as a dict: use
    `with_arrays(path, out, **{"knn.bank": x})`), written by the one bundle builder (without
    its load check: `check=False`)."""
    bundle = load_bundle(bundle_path)
    manifest = bundle.manifest.model_dump(exclude={"files", "checksum", "arrays"})
    write = write_bundle if check else write_unchecked
    return write(out, manifest, {}, {**bundle.arrays, **arrays})


def assert_refused_with(bundle_path: Path, out: Path, match: str, **arrays: np.ndarray) -> None:
    """A copy of a bundle with some arrays replaced (see `with_arrays`) is refused at load,
    with an error matching `match`, and so is writing it."""
    with pytest.raises(BundleError, match="the new bundle would not load: .*" + match):
        with_arrays(bundle_path, out, **arrays)
    bad = with_arrays(bundle_path, out, check=False, **arrays)
    with pytest.raises(BundleError, match=match):
        load_bundle(bad)
