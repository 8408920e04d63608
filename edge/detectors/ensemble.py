"""Kind `ensemble`: several detectors scored together on one common scale.

Each member (fluctuation, levels, knn, subspace, and at most one network: the int8 CNN
`embedding`, whose model is the bundle's own) scores the window as it would alone. Its score
goes on a common scale with what held-out normal audio gave it at training time: z = (ln score
- centre) / spread, with the median and the 1.4826 MAD of the held-out log scores (the scale
the CUSUM already uses). The ensemble's score is exp(mean z x mean spread): normal running
scores about 1, its log is the members' mean evidence, and it grows like a member's score
would; threshold and CUSUM are set on it like any kind's.
The members' arrays travel in the bundle's arrays.npz under a prefix each (`m0.`, `m1.`, ...),
and each member's own plugin checks them. Members are refitted on site one by one; the common
scale and the ensemble's threshold then come from the site's audio, a file held out at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from edge.detectors.base import DetectorKind, Refit, WindowScore, WindowScorer, held_out_pieces
from edge.detectors.embedding import Embedding
from edge.detectors.fluctuation import Fluctuation
from edge.detectors.knn import Knn
from edge.detectors.levels import Levels, site_refit
from edge.detectors.subspace import Subspace
from edge.errors import BundleError
from edge.threshold import check_site_varies

if TYPE_CHECKING:
    from edge.bundle import Bundle, EnsembleMember

MEMBER_PLUGINS: dict[str, DetectorKind] = {
    p.kind: p for p in (Fluctuation(), Levels(), Knn(), Subspace(), Embedding())
}
"""Kinds an ensemble may hold: the numpy scorers, and the int8 CNN embedding, whose network is
the bundle's own model (one network member at most)."""
MAD_TO_SD = 1.4826
MIN_SPREAD = 1e-3
"""Smallest spread of held-out log scores: a member whose normal scores never move still
divides."""


def common_scale(scores: np.ndarray) -> tuple[float, float]:
    """(centre, spread) of held-out normal scores: median and 1.4826 MAD of their logs."""
    logs = np.log(np.maximum(np.asarray(scores, np.float64), np.finfo(float).tiny))
    center = float(np.median(logs))
    return center, max(MAD_TO_SD * float(np.median(np.abs(logs - center))), MIN_SPREAD)


def member_view(bundle: Bundle, member: EnsembleMember) -> Bundle:
    """A member as a bundle of its own: its kind, score and arrays (prefix removed), and the
    bundle's network if it is the network member."""
    prefix = f"{member.prefix}."
    manifest = bundle.manifest.model_copy(
        update={"kind": member.kind, "score": member.score, "statistics": member.statistics}
    )
    manifest = manifest.model_copy(
        update={"threshold": manifest.threshold.model_copy(update={"params": {}})}
    )
    arrays = {k.removeprefix(prefix): v for k, v in bundle.arrays.items() if k.startswith(prefix)}
    model = bundle.model if Ensemble.wants_model_of(member.kind) else None
    return replace(bundle, manifest=manifest, model=model, arrays=arrays)


def combine(member_scores: list[np.ndarray], scales: list[tuple[float, float]]) -> np.ndarray:
    """Ensemble scores of windows from each member's scores of them and its (centre, spread):
    exp(mean z x mean spread), the geometric mean of the members' scores over their normal
    medians with every member's spread made equal (so no member outweighs the others)."""
    z = [
        (np.log(np.maximum(np.asarray(s, np.float64), np.finfo(float).tiny)) - c) / spread
        for s, (c, spread) in zip(member_scores, scales, strict=True)
    ]
    unit = float(np.mean([spread for _, spread in scales]))
    return np.exp(np.mean(z, axis=0) * unit)


@dataclass
class Member:
    """One member's scorer and where its held-out normal scores sat."""

    scorer: WindowScorer
    center: float
    spread: float


class EnsembleScorer:
    """The members' scores combined (`combine`); band evidence is their band shares, averaged."""

    def __init__(self, members: list[Member]) -> None:
        self.members = members

    def score(self, features: np.ndarray, start: int = 0) -> WindowScore:
        """Score one window of (frames, mels) log-mel features."""
        parts = [m.scorer.score(features, start) for m in self.members]
        scales = [(m.center, m.spread) for m in self.members]
        score = float(combine([np.array([p.score]) for p in parts], scales)[0])
        shares = [p.band_error / max(float(np.sum(p.band_error)), 1e-12) for p in parts]
        return WindowScore(start=start, score=score, band_error=np.mean(shares, axis=0) * score)

    def score_many(self, windows: np.ndarray) -> np.ndarray:
        """Scores of a stack of windows, shape (n,)."""
        if len(windows) == 0:
            return np.zeros(0)
        scales = [(m.center, m.spread) for m in self.members]
        return combine([m.scorer.score_many(windows) for m in self.members], scales)


class Ensemble(DetectorKind):
    """Detectors on one common scale, combined by their mean evidence."""

    kind = "ensemble"
    score_name = "ensemble-mean-z"

    def wants_model(self, manifest: Any) -> bool:
        """With a network member (the int8 CNN), the bundle's network is that member's."""
        info = manifest.ensemble
        return any(self.wants_model_of(m.kind) for m in (info.members if info else []))

    @staticmethod
    def wants_model_of(kind: str) -> bool:
        """Whether a member of this kind is a network."""
        plugin = MEMBER_PLUGINS.get(kind)
        return plugin is not None and plugin.needs_model

    def check(self, bundle: Bundle) -> None:
        """An `ensemble` section of known members with distinct prefixes, at most one of them
        with a network, each of whose arrays its own plugin accepts."""
        super().check(bundle)
        info = bundle.manifest.ensemble
        if info is None or not info.members:
            raise BundleError(f"{bundle.path}: an ensemble bundle needs an `ensemble` section")
        prefixes = [m.prefix for m in info.members]
        if len(set(prefixes)) != len(prefixes):
            raise BundleError(f"{bundle.path}: ensemble members share a prefix: {prefixes}")
        networks = [m.kind for m in info.members if self.wants_model_of(m.kind)]
        if len(networks) > 1:
            raise BundleError(f"{bundle.path}: an ensemble holds one network, not {networks}")
        for member in info.members:
            plugin = MEMBER_PLUGINS.get(member.kind)
            if plugin is None:
                known = ", ".join(sorted(MEMBER_PLUGINS))
                raise BundleError(
                    f"{bundle.path}: ensemble member kind {member.kind!r} is not one of {known}"
                )
            plugin.check(member_view(bundle, member))

    def scorer(self, bundle: Bundle) -> EnsembleScorer:
        """The members of the bundle on their common scale."""
        assert bundle.manifest.ensemble is not None  # check() ran at load
        return EnsembleScorer(
            [
                Member(MEMBER_PLUGINS[m.kind].scorer(member_view(bundle, m)), m.center, m.spread)
                for m in bundle.manifest.ensemble.members
            ]
        )

    def refit(
        self, bundle: Bundle, per_file: list[np.ndarray], false_alarms_per_day: float | None
    ) -> Refit:
        """Refit each member on the site's audio; the common scale and the threshold come from
        the refitted members' scores of each file with that file left out of the refit (one
        file: its second half against its first)."""
        info = bundle.manifest.ensemble
        assert info is not None
        files = [w for w in per_file if len(w)]
        if not files:
            raise BundleError("no audio to refit the ensemble on")
        arrays: dict[str, np.ndarray] = {}
        held: list[np.ndarray] = []
        for m in info.members:
            view = member_view(bundle, m)
            plugin = MEMBER_PLUGINS[m.kind]
            full = _with_arrays(view, plugin.refit(view, files, false_alarms_per_day).arrays)
            arrays |= {f"{m.prefix}.{k}": v for k, v in full.arrays.items()}
            held.append(plugin.held_out_scores(view, files, false_alarms_per_day))
            # each member on its own scale: the common one is the site's, near 1 whatever it is
            check_site_varies(float(np.median(held[-1])), math.exp(m.center))
        scales = [common_scale(h) for h in held]
        members = [
            m.model_copy(update={"center": c, "spread": s})
            for m, (c, s) in zip(info.members, scales, strict=True)
        ]
        combined = combine(held, scales)
        no_bands = np.zeros((len(combined), 1))
        pieces = held_out_pieces(files)  # each file a stream of its own, when they line up
        pieces = pieces if sum(pieces) == len(combined) else None
        refit = site_refit(bundle, combined, no_bands, arrays, false_alarms_per_day, pieces)
        for reference in ("normal_band_error.mean", "normal_band_error.std"):
            refit.arrays.pop(reference)  # the trained band reference stays
        refit.manifest["ensemble"] = info.model_copy(update={"members": members}).model_dump()
        return refit


def _with_arrays(view: Bundle, arrays: dict[str, np.ndarray]) -> Bundle:
    """The member view with some arrays replaced (member arrays only, no band reference)."""
    keep = {k: v for k, v in arrays.items() if not k.startswith("normal_band_error.")}
    return replace(view, arrays={**view.arrays, **keep})
