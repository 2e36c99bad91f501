"""Labelled progress bars for the long stages: shown on a terminal (stderr), silent otherwise."""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_STAGE: contextvars.ContextVar[str] = contextvars.ContextVar("graphquant_stage", default="")
_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("graphquant_progress", default=True)


@contextlib.contextmanager
def stage(label: str) -> Iterator[None]:
    """Name the stage (e.g. the running pass) that the bars opened inside it belong to."""
    token = _STAGE.set(label)
    try:
        yield
    finally:
        _STAGE.reset(token)


@contextlib.contextmanager
def showing(enabled: bool) -> Iterator[None]:
    """Turn the bars on or off inside the block."""
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def bar(
    iterable: Iterable[T] | None = None,
    task: str = "",
    *,
    total: int | None = None,
    unit: str = "it",
    show: bool = True,
) -> tqdm:
    """A tqdm bar labelled 'stage: task' on stderr, kept when done; none unless stderr is a terminal."""
    label = ": ".join(part for part in (_STAGE.get(), task) if part)
    enabled = show and _ENABLED.get()
    # disable=None: tqdm turns itself off when its stream is not a terminal.
    return tqdm(
        iterable, desc=label, total=total, unit=unit, file=sys.stderr, leave=True, disable=None if enabled else True
    )
