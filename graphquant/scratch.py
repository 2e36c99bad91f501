"""Temporary folders under TMPDIR whose write failures (a full or unusable TMPDIR) are one-line errors."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from graphquant.errors import OutputError


@contextlib.contextmanager
def scratch_folder(prefix: str = "graphquant-") -> Iterator[Path]:
    """A temporary folder, removed at the end; an OSError while making or writing it is an OutputError naming it."""
    try:
        with tempfile.TemporaryDirectory(prefix=prefix) as folder:
            yield Path(folder)
    except OSError as exc:
        raise OutputError(
            f"{_temporary_root()}: cannot write temporary files ({exc.strerror or exc}); "
            "free space there or set TMPDIR to another folder"
        ) from exc


def _temporary_root() -> str:
    """The folder temporary files go to, or the TMPDIR setting when no folder is usable."""
    try:
        return tempfile.gettempdir()
    except OSError:
        return f"TMPDIR={os.environ.get('TMPDIR', '')!r}"
