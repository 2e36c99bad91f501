"""Quantization decisions as data (QuantSpec), and the integer math shared by passes and lowering."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

INPUT_SPECS_KEY = "graphquant.input_specs"
DECISION_KEY = "graphquant.decision"
# On an activation value: its per-channel steps were pre-executed into the weights; quantize it with step 1.
PREEXECUTED_KEY = "graphquant.preexecuted_bits"
# On a layer node: the activation scheme a scale-migration pass chose, and why (for the report).
SCHEME_NOTE_KEY = "graphquant.scheme_note"
# On a weight-only layer node: whether MatMulNBits may round its input to int8 per block at run time (accuracy_level 4).
INT8_COMPUTE_KEY = "graphquant.int8_compute"
# On a layer node: the reason it must stay float.
KEEP_FLOAT_KEY = "graphquant.keep_float"
# On a graph: the list of SplitCost records of the split passes (analysis/cost.py), for the report.
SPLIT_COST_KEY = "graphquant.split_costs"
# On a Conv layer node: the calibrated per-tensor QuantSpec of its output, for lowerings that requantize it.
OUTPUT_SPEC_KEY = "graphquant.output_spec"
# quantize() converts about this many values at a time to float64, so a large weight gets no full float64 copy.
QUANTIZE_CHUNK_ELEMENTS = 1 << 20
# On a Min node: its constant bound is one value per channel of its input, which it never broadcasts to a larger shape.
CHANNEL_BOUND_KEY = "graphquant.channel_bound"
# Value metadata: the channel order (last axis) of a tensor that lowering renumbered: its channel j holds the float
# model's channel order[j] (ContiguousFloatRoutesPass). Validation compares it with the reference taken in that order.
CHANNEL_ORDER_KEY = "graphquant.channel_order"


@dataclasses.dataclass(frozen=True, eq=False)
class QuantSpec:
    """How one node input is quantized: q = clamp(round(x / scale) + zero_point, qmin, qmax).

    Granularity: per tensor (axis None, scalar scale), per axis (1-D scale along ``axis``), or blocked (ONNX opset-21
    DequantizeLinear semantics: scale has the tensor's rank, and each entry covers ``block_size`` consecutive
    elements along ``axis``).
    """

    bits: int
    signed: bool
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None
    block_size: int | None = None

    def __post_init__(self) -> None:
        """Validate bit width, scale and granularity."""
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if not np.all(np.isfinite(self.scale)) or not np.all(self.scale > 0):
            raise ValueError("scales must be finite and positive")
        if self.scale.shape != self.zero_point.shape:
            raise ValueError("scale and zero_point shapes differ")
        if (self.axis is None) != (self.scale.ndim == 0):
            raise ValueError("a per-axis or blocked spec needs an axis and an array scale; a per-tensor one neither")
        if self.block_size is not None and (self.axis is None or self.block_size < 1):
            raise ValueError("a blocked spec needs an axis and a positive block size")
        if self.block_size is None and self.scale.ndim > 1:
            raise ValueError("a per-axis spec needs a 1-D scale")

    @property
    def qmin(self) -> int:
        """Smallest integer code (restricted symmetric range for signed grids)."""
        return -(2 ** (self.bits - 1) - 1) if self.signed else 0

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def storage_dtype(self) -> type[np.integer]:
        """The numpy integer type the codes are stored in."""
        return np.int8 if self.signed else np.uint8

    @property
    def key(self) -> tuple[object, ...]:
        """A hashable identity of the spec's contents, for sharing one Q/DQ pair."""
        return (
            self.bits,
            self.signed,
            self.axis,
            self.block_size,
            self.scale.shape,
            self.scale.tobytes(),
            self.zero_point.tobytes(),
        )

    def expand(self, parameter: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """A scale or zero point reshaped (and, for blocks, repeated) to broadcast against a tensor of ``shape``."""
        if self.axis is None:
            return parameter
        axis = self.axis % len(shape)
        if self.block_size is None:
            target = [1] * len(shape)
            target[axis] = parameter.size
            return parameter.reshape(target)
        repeated = np.repeat(parameter, self.block_size, axis=axis)
        return np.take(repeated, np.arange(shape[axis]), axis=axis)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """Integer codes of ``values`` (round half to even, as QuantizeLinear does), a few rows at a time."""
        scale = self.expand(self.scale, values.shape)
        zero_point = self.expand(self.zero_point.astype(np.float64), values.shape)
        if values.ndim == 0:
            return self._codes(values, scale, zero_point)
        codes = np.empty(values.shape, self.storage_dtype)
        step = max(1, QUANTIZE_CHUNK_ELEMENTS * values.shape[0] // max(1, values.size))
        for start in range(0, values.shape[0], step):
            rows = slice(start, start + step)
            codes[rows] = self._codes(values[rows], _leading_rows(scale, rows), _leading_rows(zero_point, rows))
        return codes

    def _codes(self, values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
        """Integer codes of ``values`` against an already broadcastable scale and zero point."""
        codes = np.rint(values.astype(np.float64) / scale) + zero_point
        return np.clip(codes, self.qmin, self.qmax).astype(self.storage_dtype)

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        """Float values of integer codes."""
        scale = self.expand(self.scale, codes.shape)
        zero_point = self.expand(self.zero_point.astype(np.float32), codes.shape)
        return ((codes.astype(np.float32) - zero_point) * scale).astype(np.float32)


def _leading_rows(parameter: np.ndarray, rows: slice) -> np.ndarray:
    """The rows of a broadcastable parameter that line up with ``rows`` of the tensor (all of a size-1 axis)."""
    return parameter[rows] if parameter.ndim and parameter.shape[0] > 1 else parameter


def symmetric_spec(
    absmax: np.ndarray | float, bits: int, axis: int | None = None, block_size: int | None = None
) -> QuantSpec:
    """A signed symmetric spec whose grid covers ±absmax; zero ranges get scale 1 instead of 0."""
    qmax = 2 ** (bits - 1) - 1
    scale = _usable_scale(np.asarray(absmax, dtype=np.float32) / np.float32(qmax))
    zero_point = np.zeros(scale.shape, np.int8)
    return QuantSpec(bits=bits, signed=True, scale=scale, zero_point=zero_point, axis=axis, block_size=block_size)


def asymmetric_spec(
    minimum: np.ndarray | float,
    maximum: np.ndarray | float,
    bits: int,
    axis: int | None = None,
    block_size: int | None = None,
) -> QuantSpec:
    """An unsigned spec whose grid covers [min(minimum, 0), max(maximum, 0)], zero exactly on the grid."""
    qmax = 2**bits - 1
    low = np.minimum(np.asarray(minimum, dtype=np.float32), 0)
    high = np.maximum(np.asarray(maximum, dtype=np.float32), 0)
    scale = _usable_scale((high - low) / np.float32(qmax))
    zero_point = np.clip(np.rint(-low / scale), 0, qmax).astype(np.uint8)
    return QuantSpec(bits=bits, signed=False, scale=scale, zero_point=zero_point, axis=axis, block_size=block_size)


def _usable_scale(scale: np.ndarray) -> np.ndarray:
    """The scale with zero, subnormal or non-finite entries (zero-range channels) replaced by 1."""
    usable = np.isfinite(scale) & (scale > np.finfo(np.float32).tiny)
    return np.where(usable, scale, np.float32(1.0)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LayerDecision:
    """What the pipeline did with one layer, and why; the report is built from these."""

    node: str
    op_type: str
    status: str
    reason: str
    scheme: str = ""
    output: str = ""
