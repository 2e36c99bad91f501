"""Quantization decisions as data (QuantSpec), and the integer math shared by passes and lowering."""

from __future__ import annotations

import dataclasses

import numpy as np

INPUT_SPECS_KEY = "graphquant.input_specs"
DECISION_KEY = "graphquant.decision"
# On an activation value: its per-channel steps were pre-executed into the weights; quantize it with step 1.
PREEXECUTED_KEY = "graphquant.preexecuted_bits"
# On a layer node: the activation scheme a scale-migration pass chose, and why (for the report).
SCHEME_NOTE_KEY = "graphquant.scheme_note"
# On a layer node: the reason it must stay float.
KEEP_FLOAT_KEY = "graphquant.keep_float"


@dataclasses.dataclass(frozen=True, eq=False)
class QuantSpec:
    """How one node input is quantized: q = clamp(round(x / scale) + zero_point, qmin, qmax)."""

    bits: int
    signed: bool
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None

    def __post_init__(self) -> None:
        """Validate bit width, scale and granularity."""
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if not np.all(np.isfinite(self.scale)) or not np.all(self.scale > 0):
            raise ValueError("scales must be finite and positive")
        if self.scale.shape != self.zero_point.shape:
            raise ValueError("scale and zero_point shapes differ")
        if (self.axis is None) != (self.scale.ndim == 0):
            raise ValueError("a per-axis spec needs a 1-D scale; a per-tensor spec a scalar one")

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
        return (self.bits, self.signed, self.axis, self.scale.tobytes(), self.zero_point.tobytes())

    def broadcast(self, array: np.ndarray, rank: int) -> np.ndarray:
        """Reshape a per-axis parameter so it broadcasts against a tensor of the given rank."""
        if self.axis is None:
            return array
        shape = [1] * rank
        shape[self.axis % rank] = array.size
        return array.reshape(shape)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """Integer codes of ``values`` (round half to even, as QuantizeLinear does)."""
        scale = self.broadcast(self.scale, values.ndim)
        zero_point = self.broadcast(self.zero_point.astype(np.float64), values.ndim)
        codes = np.rint(values.astype(np.float64) / scale) + zero_point
        return np.clip(codes, self.qmin, self.qmax).astype(self.storage_dtype)

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        """Float values of integer codes."""
        scale = self.broadcast(self.scale, codes.ndim)
        zero_point = self.broadcast(self.zero_point.astype(np.float32), codes.ndim)
        return ((codes.astype(np.float32) - zero_point) * scale).astype(np.float32)


def symmetric_spec(absmax: np.ndarray | float, bits: int, axis: int | None = None) -> QuantSpec:
    """A signed symmetric spec whose grid covers ±absmax; zero ranges get scale 1 instead of 0."""
    qmax = 2 ** (bits - 1) - 1
    scale = np.asarray(absmax, dtype=np.float32) / np.float32(qmax)
    usable = np.isfinite(scale) & (scale > np.finfo(np.float32).tiny)
    scale = np.where(usable, scale, np.float32(1.0)).astype(np.float32)
    return QuantSpec(bits=bits, signed=True, scale=scale, zero_point=np.zeros(scale.shape, np.int8), axis=axis)


@dataclasses.dataclass(frozen=True)
class LayerDecision:
    """What the pipeline did with one layer, and why; the report is built from these."""

    node: str
    op_type: str
    status: str
    reason: str
    scheme: str = ""
    output: str = ""
