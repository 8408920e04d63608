"""Progress bars for long loops (tqdm when installed; silent otherwise, e.g. on the Pi)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Wrap `items` in a tqdm bar on stderr when available and stderr is a terminal."""
    try:
        from tqdm import tqdm
    except ImportError:
        yield from items
        return
    yield from tqdm(
        items, desc=desc, total=total, unit="file", disable=not sys.stderr.isatty(), leave=False
    )
