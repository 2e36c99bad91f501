"""Pipeline: an ordered list of onnx_ir passes run top to bottom."""

from __future__ import annotations

import time
from collections.abc import Iterable

import onnx_ir as ir

from graphquant import progress
from graphquant.analysis.runner import release_mappings


class PassFailedError(ir.passes.PassError):
    """A pass of a pipeline raised; ``failed`` is that pass, and the cause is its exception."""

    def __init__(self, failed: ir.passes.PassBase):
        super().__init__(f"pass {type(failed).__name__} failed")
        self.failed = failed


class Pipeline(ir.passes.Sequential):
    """Runs the given passes in order; ``Pipeline([...])(model)`` returns an onnx_ir PassResult."""

    def __init__(self, passes: Iterable[ir.passes.PassBase]):
        steps = list(passes)
        if not steps:
            raise ValueError("a pipeline needs at least one pass")
        super().__init__(*steps)
        # (command-line label, seconds) of each step of the last run, in order.
        self.timings: list[tuple[str, float]] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Run each pass on the model under its own progress label; a failure is a PassFailedError naming the pass."""
        modified = False
        self.timings = []
        for step in self.passes:
            start = time.perf_counter()
            try:
                with progress.stage(pass_label(step)):
                    result = step(model)
            except Exception as exc:
                raise PassFailedError(step) from exc
            self.timings.append((pass_label(step), time.perf_counter() - start))
            model, modified = result.model, modified or result.modified
            release_mappings(model)  # the weight pages this pass read: the next pass maps what it reads again
        return ir.passes.PassResult(model, modified)

    def describe(self) -> list[str]:
        """The class names of the passes, in order."""
        return [type(p).__name__ for p in self.passes]


def pass_label(step: ir.passes.PassBase) -> str:
    """The pass's command-line name, else its class name without the Pass suffix (lowering passes)."""
    from graphquant.passes import PASSES  # the pass modules import the analysis that imports this module's users

    names = {cls: name for name, cls in PASSES.items()}
    return names.get(type(step), type(step).__name__.removesuffix("Pass"))
