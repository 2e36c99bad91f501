"""The calibration engine: one streaming onnxruntime pass that reduces intermediates as it goes."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from graphquant import progress
from graphquant.analysis.data import CalibrationData, CalibrationSource, InputSpec
from graphquant.analysis.runner import RecordedOutputs, open_segmented
from graphquant.analysis.stats import CalibrationStats, TensorStats
from graphquant.errors import CalibrationError

if TYPE_CHECKING:
    from graphquant.analysis.distributed import RayCluster


class NonFiniteCalibrationWarning(UserWarning):
    """Some calibration values were NaN or Inf and were left out of the statistics."""


class Calibrator:
    """Collects statistics of named tensors of a model over a calibration data set."""

    def __init__(self, data: CalibrationData, show_progress: bool = True, cluster: RayCluster | None = None):
        self.data = data
        self.show_progress = show_progress
        self.cluster = cluster
        self._warned_nonfinite = False

    @classmethod
    def for_model(
        cls, model: ir.Model, source: CalibrationSource, show_progress: bool = True, cluster: RayCluster | None = None
    ) -> Calibrator:
        """A calibrator whose feeds are checked against the model's inputs (run on ``cluster``'s workers if given)."""
        return cls(CalibrationData(source, InputSpec.of_model(model)), show_progress, cluster)

    def collect(
        self,
        model: ir.Model,
        tensor_names: Sequence[str],
        sample_rows: int = 0,
        gram_names: Sequence[str] = (),
        observe: Callable[[str, np.ndarray], None] | None = None,
        histogram: bool = True,
        recording: RecordedOutputs | None = None,
    ) -> CalibrationStats:
        """Run the model over the data once and reduce the named tensors per batch (keeping a bounded row sample).

        Tensors in ``gram_names`` also accumulate their channel Gram matrix X^T X. ``observe(name, batch)`` also sees
        every float batch of the named tensors (e.g. analysis/conv_gram.py's im2col Grams). With a cluster, the batches
        run on its workers, except under ``observe``, which needs them here. ``histogram`` False says the caller reads
        no |x| histogram (a caching calibrator may then answer with derived statistics; these are always exact).
        A ``recording`` (run here, not on a cluster) also keeps its tensors of every feed, unreduced unless named.
        """
        names = sorted(set(tensor_names))
        stats = CalibrationStats()
        if not names:
            return stats
        feeds = progress.bar(self.data, "calibrating", unit="batch", show=self.show_progress)
        if self.cluster is not None and observe is None and recording is None:
            stats = self.cluster.collect(model, names, feeds, sample_rows, gram_names)
        else:
            recorded = [] if recording is None else [name for name in recording.names if name not in names]
            with open_segmented(model, [*names, *recorded]) as run:
                for feed in feeds:
                    if recording is not None:
                        recording.start(feed)
                    for outputs in run(feed):
                        reduced = {name: outputs[name] for name in names if name in outputs}
                        if recording is not None:
                            recording.keep(outputs)
                        reduce_batch(stats, reduced, sample_rows, gram_names, observe)
                    stats.batches += 1
        self._check_finite(stats)
        return stats

    def record(self, model: ir.Model, derived: Mapping[str, TensorStats]) -> None:
        """Statistics of tensors an exact rewrite made, derived from the ones before it: this calibrator keeps none."""

    def reference_outputs(self) -> RecordedOutputs | None:
        """A float model's outputs recorded while calibrating, for validation: this calibrator records none."""
        return None

    def _check_finite(self, stats: CalibrationStats) -> None:
        """Refuse tensors with no finite value; warn once about left-out NaN/Inf (in the inputs, else inside)."""
        for name, tensor_stats in stats.tensors.items():
            if not tensor_stats.has_finite_values:
                raise CalibrationError(f"tensor {name!r} has no finite value in the calibration data")
        counts = self.data.nonfinite or {name: s.nonfinite for name, s in stats.tensors.items() if s.nonfinite}
        if not counts or self._warned_nonfinite:
            return
        self._warned_nonfinite = True
        where = "inputs" if self.data.nonfinite else "tensors"
        listed = ", ".join(f"{name!r}: {count}" for name, count in sorted(counts.items()))
        warnings.warn(
            f"{sum(counts.values())} NaN/Inf values in the calibration {where} were left out of the statistics "
            f"({listed})",
            NonFiniteCalibrationWarning,
            stacklevel=3,
        )


def reduce_batch(
    stats: CalibrationStats,
    outputs: dict[str, np.ndarray],
    sample_rows: int,
    gram_names: Sequence[str],
    observe: Callable[[str, np.ndarray], None] | None,
) -> None:
    """Fold one batch's float outputs into the statistics, dropping each once reduced (none outlives the call)."""
    for name in list(outputs):
        value = outputs.pop(name)
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            stats.update(name, value, sample_rows, gram=name in gram_names)
            if observe is not None:
                observe(name, value)
