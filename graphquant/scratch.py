"""Temporary folders under TMPDIR whose write failures (a full or unusable TMPDIR) are one-line errors, and large
arrays whose pages live in a temporary file."""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from graphquant.errors import OutputError

# Arrays from this size on get their pages from a temporary file (file_backed_array).
FILE_BACKED_BYTES = 4 << 20
# The shared mappings of those files, which dropping pages never loses data from.
_FILE_MAPPINGS: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()


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


def file_backed_array(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array whose pages, from FILE_BACKED_BYTES on, live in an already unlinked temporary file.

    Its resident pages can be dropped (file_mapping) and are read back from the file when used. Smaller arrays, a
    system without unlinked-while-mapped files or a failed file are plain memory.
    """
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if size < FILE_BACKED_BYTES or os.name != "posix":
        return np.empty(shape, dtype)
    try:
        with tempfile.TemporaryFile(prefix="graphquant-") as file:
            file.truncate(size)
            array = np.memmap(file, dtype=dtype, mode="r+", shape=shape).view(np.ndarray)
    except OSError:
        return np.empty(shape, dtype)
    mapping = file_mapping(array, known=False)
    assert mapping is not None
    _FILE_MAPPINGS.add(mapping)
    return array


def file_mapping(array: np.ndarray, known: bool = True) -> mmap.mmap | None:
    """The mapping under a file_backed_array or a view of one (any mapping with ``known`` False), else None."""
    base: object = array
    while isinstance(base, np.ndarray):
        base = base.base
    return base if isinstance(base, mmap.mmap) and (not known or base in _FILE_MAPPINGS) else None


def drop_pages(array: np.ndarray) -> None:
    """Drop the resident pages of a file_backed_array (they are read back from its file when used); else a no-op."""
    mapping = file_mapping(array)
    if mapping is not None and not mapping.closed:
        mapping.madvise(mmap.MADV_DONTNEED)
