"""Files that appear whole or not at all: write to a temporary name beside, then rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success rename it onto ``path``.

    A failure (or an interrupt) inside the block removes the temporary file and leaves any
    earlier ``path`` untouched, so a reader never sees a half-written file. ``suffix`` matters
    to writers that pick the format from the name (matplotlib).

    Example:
        >>> with replacing("result.nc") as tmp:                          # doctest: +SKIP
        ...     ds.to_netcdf(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    with replacing(path) as tmp:
        tmp.write_text(text)
    return Path(path)
