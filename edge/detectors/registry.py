"""The one place that reads a bundle's `kind`: it picks the detector plugin."""

from __future__ import annotations

from typing import Any

from edge.detectors.autoencoder import Autoencoder
from edge.detectors.base import DetectorKind
from edge.detectors.classifier import Classifier
from edge.detectors.embedding import Embedding
from edge.detectors.ensemble import Ensemble
from edge.detectors.fluctuation import Fluctuation
from edge.detectors.knn import Knn
from edge.detectors.levels import Levels
from edge.detectors.subspace import Subspace
from edge.errors import BundleError

PLUGINS: dict[str, DetectorKind] = {
    p.kind: p
    for p in (
        Autoencoder(),
        Classifier(),
        Fluctuation(),
        Levels(),
        Knn(),
        Embedding(),
        Subspace(),
        Ensemble(),
    )
}
"""Every detector kind this version runs, by the `kind` field of a bundle's manifest."""


def plugin_for(manifest: Any) -> DetectorKind:
    """The plugin of a manifest's kind; BundleError for a kind this version does not know."""
    kind = manifest.kind
    try:
        return PLUGINS[kind]
    except KeyError:
        known = ", ".join(sorted(PLUGINS))
        raise BundleError(
            f"detector kind {kind!r} is unknown to this version (it runs: {known})"
        ) from None


def kind_of(manifest: Any) -> str:
    """The kind's name, for display."""
    return plugin_for(manifest).kind
