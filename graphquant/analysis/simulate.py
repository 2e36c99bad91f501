"""Fake-quantization of one scale group on sampled rows, to choose schemes by measured output error."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from graphquant.analysis.layers import Layer


def fake_quantize(values: np.ndarray, step: np.ndarray | float, bits: int) -> np.ndarray:
    """Symmetric round-to-nearest on a grid of the given step, clamped to the restricted signed range."""
    qmax = 2 ** (bits - 1) - 1
    return np.clip(np.rint(values / step), -qmax, qmax) * step


def weight_matrix(layer: Layer) -> np.ndarray:
    """The weight as [C_in, C_out] float64."""
    weight = layer.weight_array.astype(np.float64)
    return weight if layer.in_axis == 0 else weight.T


def group_sqnr_db(
    rows: np.ndarray,
    layers: Sequence[Layer],
    divisor: np.ndarray,
    abits: int,
    wbits: int,
    activation_step: float | None = None,
) -> float:
    """SQNR of the group's outputs when X/divisor is quantized (step given, or per-tensor absmax) and W·divisor per column."""
    x = rows.astype(np.float64)
    scaled = x / divisor
    qmax = 2 ** (abits - 1) - 1
    step = activation_step if activation_step is not None else max(float(np.abs(scaled).max()), 1e-12) / qmax
    x_quantized = fake_quantize(scaled, step, abits)
    signal = 0.0
    noise = 0.0
    for layer in layers:
        weight = weight_matrix(layer)
        migrated = weight * divisor[:, None]
        column_step = np.maximum(np.abs(migrated).max(axis=0), 1e-12) / (2 ** (wbits - 1) - 1)
        reference = x @ weight
        approximate = x_quantized @ fake_quantize(migrated, column_step[None, :], wbits)
        signal += float(np.sum(reference**2))
        noise += float(np.sum((reference - approximate) ** 2))
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-30) / noise)
