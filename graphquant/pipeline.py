"""Pipeline: an ordered list of onnx_ir passes run top to bottom."""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir


class Pipeline(ir.passes.Sequential):
    """Runs the given passes in order; ``Pipeline([...])(model)`` returns an onnx_ir PassResult."""

    def __init__(self, passes: Iterable[ir.passes.PassBase]):
        steps = list(passes)
        if not steps:
            raise ValueError("a pipeline needs at least one pass")
        super().__init__(*steps)

    def describe(self) -> list[str]:
        """The class names of the passes, in order."""
        return [type(p).__name__ for p in self.passes]
