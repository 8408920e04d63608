"""Kind `classifier`: an int8 CNN that names the machine's state; a confident change of class
is an event carrying the new label."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge.detectors.base import DetectorKind, Tracker, require_normalization
from edge.detectors.network import NetworkScorer
from edge.errors import BundleError, SettingsError
from edge.events import ClassTracker

if TYPE_CHECKING:
    from edge.bundle import Bundle
    from edge.settings import DetectorSettings


class Classifier(DetectorKind):
    """Softmax over the labelled states."""

    kind = "classifier"
    score_name = "softmax"
    needs_model = True
    explains = False

    def check(self, bundle: Bundle) -> None:
        """Labels, one per model output, and the normalisation."""
        super().check(bundle)
        labels = bundle.manifest.labels
        if not labels:
            raise BundleError(f"{bundle.path}: a classifier bundle needs its class labels")
        outputs = bundle.model.output_size if bundle.model is not None else len(labels)
        if outputs != len(labels):
            raise BundleError(
                f"{bundle.path}: {len(labels)} labels for a model with {outputs} outputs"
            )
        if not 0 < bundle.threshold < 1:  # the int8 softmax never reaches 1 (the tracker's)
            raise BundleError(
                f"{bundle.path}: a classifier's threshold is a probability below 1 "
                f"({bundle.threshold:g})"
            )
        require_normalization(bundle)

    def scorer(self, bundle: Bundle) -> NetworkScorer:
        """The network with its labels."""
        return NetworkScorer.of(bundle, labels=list(bundle.manifest.labels or []))

    def tracker(self, bundle: Bundle, settings: DetectorSettings, threshold: float) -> Tracker:
        """A class change takes K of the last N confident windows."""
        if not 0 < threshold < 1:  # [detector] threshold: the int8 softmax never reaches 1
            raise SettingsError(
                f"detector.threshold {threshold:g}: a classifier's threshold is the probability "
                "a window must reach for its class, between 0 and 1 (the bundle's: "
                f"{bundle.threshold:g})"
            )
        labels = list(bundle.manifest.labels or [])
        k, n = settings.k_of_n(bundle.manifest.threshold.params)
        return ClassTracker(labels, threshold, k, n, update_s=settings.update_seconds)
