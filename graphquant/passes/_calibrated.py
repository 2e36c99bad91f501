"""Shared base of the passes that rewrite MatMul/Gemm scale groups from calibrated statistics."""

from __future__ import annotations

import onnx_ir as ir

from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.layers import ScaleGroup, migratable_groups
from graphquant.analysis.stats import TensorStats

# The row sample the groups' searches score on (symmetrize keeps it too, so that preexecute-dequant's statistics can
# be derived from its own without a second calibration).
GROUP_SAMPLE_ROWS = 2048


class CalibratedGroupPass(ir.passes.InPlacePass):
    """An in-place pass over scale groups; ``done_key`` on an activation marks a group it already rewrote."""

    cli_name = ""
    done_key = ""

    def __init__(self, calibrator: Calibrator | None = None):
        super().__init__()
        self.calibrator = calibrator

    def requires(self, model: ir.Model) -> None:
        """The statistics come from calibration."""
        if self.calibrator is None:
            raise ir.passes.PreconditionError(f"{self.cli_name} needs calibration data")

    def pending_groups(self, model: ir.Model, sample_rows: int = 0) -> list[tuple[ScaleGroup, TensorStats]]:
        """The groups not rewritten yet, each with its activation's statistics (one calibration run, or none where
        an earlier exact rewrite derived them: these passes read no histogram)."""
        assert self.calibrator is not None
        groups = [g for g in migratable_groups(model.graph) if self.done_key not in g.activation.meta]
        names = [g.activation.name or "" for g in groups]
        stats = self.calibrator.collect(model, names, sample_rows=sample_rows, histogram=False)
        return [(group, stats[group.activation.name or ""]) for group in groups]

    def record_rewritten(self, model: ir.Model, rewritten: list[tuple[ScaleGroup, TensorStats]]) -> None:
        """Hand the calibrator each group's statistics for the activation its layers read after the rewrite."""
        assert self.calibrator is not None
        self.calibrator.record(model, {group.layers[0].activation.name or "": stats for group, stats in rewritten})
