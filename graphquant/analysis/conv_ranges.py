"""Conv activation statistics reduced inside onnxruntime, and MSE-optimal clipping of an activation grid.

The calibrator's statistics keep one vector per tensor's last axis and histogram every value; for a Conv's NCHW
input or output that is the width axis, and its histograms dominate calibration time. Here each such tensor is
reduced in the graph, on a clone, to per-channel (axis 1) min, max, mean and mean square per batch, and only a
strided spatial subsample (every SUBSAMPLE-th position of each spatial axis) leaves onnxruntime whole, for the |x|
histogram that percentile and MSE ranges read. Per-tensor min and max stay exact.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.channel_probe import append_reduction, values_by_name
from graphquant.analysis.layers import Layer
from graphquant.analysis.stats import BINS_PER_OCTAVE, HIST_MIN_EXP, CalibrationStats, TensorStats
from graphquant.graph_edit import NameScope, add_initializer

SUBSAMPLE = 4
PROBES = ("min", "max", "mean", "square", "sample")


def conv_activation_ranks(layers: Sequence[Layer]) -> dict[str, int]:
    """Each Conv layer's input activation and output, by name, with its rank (the weight's)."""
    ranks: dict[str, int] = {}
    for layer in layers:
        if layer.node.op_type == "Conv" and layer.weight_array.ndim >= 3:
            for value in (layer.activation, layer.node.outputs[0]):
                ranks[value.name or ""] = layer.weight_array.ndim
    return ranks


def collect(
    calibrator: Calibrator,
    model: ir.Model,
    names: Sequence[str],
    conv_ranks: Mapping[str, int],
    gram_names: Sequence[str] = (),
    observe: Callable[[str, np.ndarray], None] | None = None,
    observed: Collection[str] = (),
) -> CalibrationStats:
    """Statistics of every named tensor in one calibration run; those in ``conv_ranks`` are reduced in the graph.

    ``observe`` sees every batch of the ``observed`` tensors whole (e.g. analysis/conv_gram.py's im2col Grams).
    """
    probe = model.clone()
    values = values_by_name(probe.graph)
    scope = NameScope(probe.graph)
    reduced: dict[str, dict[str, str]] = {}
    for name in sorted(set(names)):
        value, rank = values.get(name), conv_ranks.get(name, 0)
        if value is not None and rank >= 3:
            reduced[name] = _append_probes(probe, scope, value, rank)
    plain = [name for name in names if name not in reduced]
    whole = [name for name in observed if name in reduced]
    outputs = [output for probes in reduced.values() for output in probes.values()]
    stats = calibrator.collect(probe, plain + whole + outputs, gram_names=gram_names, observe=observe)
    result = CalibrationStats({name: stats[name] for name in plain if name in stats}, stats.batches)
    for name, probes in reduced.items():
        if all(output in stats for output in probes.values()):
            result.tensors[name] = _conv_stats(stats, probes)
    return result


def _append_probes(model: ir.Model, names: NameScope, value: ir.Value, rank: int) -> dict[str, str]:
    """Append the per-channel reductions and the spatial subsample of ``value``; probe -> output name."""
    square = ir.node("Mul", [value, value], name=names.fresh(f"{value.name}_square"))
    square.outputs[0].name = names.fresh(f"{value.name}_squared")
    model.graph.append(square)
    spatial = rank - 2
    base = f"{value.name}_subsample"
    slice_inputs = [
        value,
        add_initializer(model.graph, names, f"{base}_starts", np.zeros(spatial, np.int64)),
        add_initializer(model.graph, names, f"{base}_ends", np.full(spatial, np.iinfo(np.int64).max)),
        add_initializer(model.graph, names, f"{base}_axes", np.arange(2, rank, dtype=np.int64)),
        add_initializer(model.graph, names, f"{base}_steps", np.full(spatial, SUBSAMPLE, np.int64)),
    ]
    sample = ir.node("Slice", slice_inputs, name=names.fresh(base))
    sample.outputs[0].name = names.fresh(base)
    model.graph.append(sample)
    return {
        "min": append_reduction(model, names, value, rank, "ReduceMin"),
        "max": append_reduction(model, names, value, rank, "ReduceMax"),
        "mean": append_reduction(model, names, value, rank, "ReduceMean"),
        "square": append_reduction(model, names, square.outputs[0], rank, "ReduceMean"),
        "sample": sample.outputs[0].name,
    }


def _conv_stats(stats: CalibrationStats, probes: Mapping[str, str]) -> TensorStats:
    """One tensor's statistics: channels on axis 1, each batch's mean counted once, the subsample's histogram."""
    means, squares, sample = stats[probes["mean"]], stats[probes["square"]], stats[probes["sample"]]
    return TensorStats(
        channel_min=stats[probes["min"]].channel_min,
        channel_max=stats[probes["max"]].channel_max,
        abs_histogram=sample.abs_histogram,
        count=means.count,
        channel_sum=means.channel_sum,
        channel_sum_squares=squares.channel_sum,
        nonfinite=sample.nonfinite,
    )


def mse_bound(stats: TensorStats, bits: int, unsigned: bool) -> float:
    """The grid bound c <= max|x| that minimizes the expected squared error over the |x| histogram.

    A value below c costs the rounding noise step^2 / 12 (step = c / levels), one above it the clipping error
    (|x| - c)^2; bin 0 (|x| below the smallest edge, zeros included) rounds to zero exactly. Candidates are the
    histogram's bin edges below max|x|, and max|x| itself.
    """
    counts = stats.abs_histogram.astype(np.float64)
    absmax = stats.absmax
    if absmax <= 0 or counts.sum() == 0:
        return absmax
    levels = 2**bits - 1 if unsigned else 2 ** (bits - 1) - 1
    index = np.arange(counts.size)
    # Bin i >= 1 spans [2^(e + (i-1)/B), 2^(e + i/B)); its values are represented by the geometric centre.
    centres = np.minimum(2.0 ** (HIST_MIN_EXP + (index - 0.5) / BINS_PER_OCTAVE), absmax)
    edges = 2.0 ** (HIST_MIN_EXP + index / BINS_PER_OCTAVE)
    candidates = np.append(edges[(edges < absmax) & (edges > absmax / 2**bits)], absmax)
    live = index > 0
    errors = [
        np.sum(
            counts[live] * np.where(centres[live] <= c, (c / levels) ** 2 / 12.0, (centres[live] - c) ** 2),
        )
        for c in candidates
    ]
    return float(candidates[int(np.argmin(errors))])
