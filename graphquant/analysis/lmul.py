"""L-Mul, the linear-complexity multiply, in numpy: the reference the ONNX emulation (passes/lmul.py) must match.

Operands are first rounded to a small float format (round to nearest, ties to even, in the format's exponent range):

- finite values beyond the format's largest finite magnitude saturate to it; ±inf stay ±inf and NaN stays NaN;
- below the smallest normal, formats with subnormals round on the subnormal grid (underflow to ±0 under half
  its step); bf16-like flushes magnitudes under its smallest normal to ±0 (its subnormals are float32 subnormals,
  which the integer add on float32 bits cannot take).

L-Mul(x, y) = (-1)^(sx⊕sy) · (1 + xm + ym + 2^-l(m)) · 2^(xe+ye) with l(m) = m (m ≤ 3), 3 (m = 4), 4 (m > 4),
computed as one integer add on float32 bits: |x|bits + |y|bits - 0x3F800000 + 2^(23-l). The adder carries
c = floor(t) of the mantissa sum t = xm + ym + 2^-l into the exponent, so the product is (1 + t - c) · 2^(xe+ye+c):
the formula above for t < 1, t · 2^(xe+ye+1) (Mitchell's antilog) for 1 <= t < 2, and (t - 1) · 2^(xe+ye+2) when
2^-l pushes t to 2 or more (possible for m = 4 and m = 7). A subnormal operand of the format is a normal float32, so it enters normalized. The result is exact in
float32 (an m-bit mantissa) unless it leaves float32's range: under its smallest normal it is ±0, over its largest
finite it is ±inf (only bf16-like operands get there). Zero times finite is ±0 (signs xored), inf times nonzero is
±inf, inf times zero and NaN times anything are NaN, as in IEEE multiplication.
"""

from __future__ import annotations

import dataclasses

import numpy as np

FLOAT32_ONE_BITS = 0x3F800000
FLOAT32_MANTISSA_BITS = 23
FLOAT32_EXPONENT_MASK = 0x7F800000
FLOAT32_SIGN_MASK = 0x80000000
FLOAT32_INF_BITS = 0x7F800000
FLOAT32_MIN_NORMAL_BITS = 1 << FLOAT32_MANTISSA_BITS
# The magnitude that stands for a zero operand in the integer add (its product is then zeroed by the marker).
ZERO_STAND_IN = 2.0**-32


@dataclasses.dataclass(frozen=True)
class FloatFormat:
    """A small binary float format: exponent and mantissa widths, largest finite magnitude, subnormal support."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    max_finite: float
    subnormals: bool = True

    @property
    def bias(self) -> int:
        """The exponent bias, 2^(e-1) - 1."""
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def min_normal(self) -> float:
        """The smallest normal magnitude, 2^(1-bias)."""
        return 2.0 ** (1 - self.bias)

    @property
    def min_step(self) -> float:
        """The grid step at the bottom of the range: the smallest subnormal (or normal step without subnormals)."""
        return 2.0 ** (1 - self.bias - self.mantissa_bits)

    @property
    def scale_target(self) -> float:
        """Where a per-tensor scale puts the largest magnitude: max_finite, at most 2^16.

        The cap only binds for bf16-like, whose range is float32's: it keeps products and their float32 sums finite.
        """
        return min(self.max_finite, 2.0**16)

    @property
    def offset_exponent(self) -> int:
        """l(m) of the 2^-l(m) offset that stands in for xm·ym."""
        m = self.mantissa_bits
        return m if m <= 3 else 3 if m == 4 else 4


def _fn_max(exponent_bits: int, mantissa_bits: int) -> float:
    """Largest finite value when the all-ones exponent is finite and only its top mantissa code is NaN (OCP FN)."""
    bias = 2 ** (exponent_bits - 1) - 1
    return (2.0 - 2.0 ** (1 - mantissa_bits)) * 2.0 ** (2**exponent_bits - 1 - bias)


def _ieee_max(exponent_bits: int, mantissa_bits: int) -> float:
    """Largest finite value when the all-ones exponent holds inf and NaN (IEEE 754)."""
    bias = 2 ** (exponent_bits - 1) - 1
    return (2.0 - 2.0**-mantissa_bits) * 2.0 ** (2**exponent_bits - 2 - bias)


# m = 2: e5m2 (IEEE-style); m = 3: e4m3 (OCP e4m3fn); m = 4: e4m3's exponent range with one more mantissa bit (a
# 9-bit format); m = 7: bfloat16's exponent range and mantissa, subnormals flushed.
FORMATS: dict[str, FloatFormat] = {
    "e5m2": FloatFormat("e5m2", 5, 2, _ieee_max(5, 2)),
    "e4m3": FloatFormat("e4m3", 4, 3, _fn_max(4, 3)),
    "e4m4": FloatFormat("e4m4", 4, 4, _fn_max(4, 4)),
    "bf16": FloatFormat("bf16", 8, 7, _ieee_max(8, 7), subnormals=False),
}


def round_to_format(x: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """x (float32) rounded to nearest-even in ``fmt``, saturating finite overflow; float32 out (exact)."""
    x = np.asarray(x, np.float32)
    magnitude = np.abs(x.astype(np.float64))
    finite = np.isfinite(magnitude)
    clipped = np.where(finite, np.minimum(magnitude, fmt.max_finite), 0.0)
    _, exponent = np.frexp(np.where(clipped > 0, clipped, 1.0))
    # Step of the grid at this magnitude: 2^(floor(log2|x|) - m), never below the bottom step.
    step = np.maximum(np.ldexp(1.0, exponent - 1 - fmt.mantissa_bits), fmt.min_step)
    rounded = np.round(clipped / step) * step
    if not fmt.subnormals:
        rounded = np.where(clipped < fmt.min_normal, 0.0, rounded)
    rounded = np.where(finite, rounded, magnitude)
    return np.copysign(rounded, x.astype(np.float64)).astype(np.float32)


def lmul(x: np.ndarray, y: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """Elementwise L-Mul of x and y (broadcast) after rounding both to ``fmt``, by the integer add on float32 bits."""
    xr, yr = np.broadcast_arrays(round_to_format(x, fmt), round_to_format(y, fmt))
    x_bits = np.abs(xr).view(np.uint32).astype(np.int64)
    y_bits = np.abs(yr).view(np.uint32).astype(np.int64)
    offset = 1 << (FLOAT32_MANTISSA_BITS - fmt.offset_exponent)
    total = x_bits + y_bits - FLOAT32_ONE_BITS + offset
    total = np.where(total < FLOAT32_MIN_NORMAL_BITS, 0, np.minimum(total, FLOAT32_INF_BITS))
    sign = (xr.view(np.uint32) ^ yr.view(np.uint32)) & FLOAT32_SIGN_MASK
    product = (total.astype(np.uint32) | sign).view(np.float32)
    zero = (xr == 0) | (yr == 0)
    infinite = np.isinf(xr) | np.isinf(yr)
    product = np.where(zero, (sign.astype(np.uint32)).view(np.float32), product)
    product = np.where(infinite, np.where(sign != 0, -np.inf, np.inf).astype(np.float32), product)
    invalid = np.isnan(xr) | np.isnan(yr) | (zero & infinite)
    return np.where(invalid, np.float32(np.nan), product).astype(np.float32)


def operand_codes(x: np.ndarray, fmt: FloatFormat) -> tuple[np.ndarray, np.ndarray]:
    """Per operand, what the emulation adds and multiplies: int32 magnitude bits and a float32 special marker.

    The marker is ±1 for finite nonzero values, ±0, ±inf or NaN for the special ones, and their IEEE product decides
    sign, zero, inf and NaN. The magnitude is the rounded |x|, ZERO_STAND_IN for zero and the saturated value for inf
    and NaN; these stand-ins keep the integer product finite and nonzero wherever the marker product is inf or 0.
    """
    x = np.asarray(x, np.float32)
    rounded = np.abs(round_to_format(np.where(np.isfinite(x), x, np.copysign(np.float32(fmt.max_finite), x)), fmt))
    magnitude = np.where(rounded == 0, np.float32(ZERO_STAND_IN), rounded).astype(np.float32)
    marker = np.where(np.isnan(x), np.nan, np.where(np.isinf(x), np.inf, np.where(rounded == 0, 0.0, 1.0)))
    sign = x.view(np.uint32) & np.uint32(FLOAT32_SIGN_MASK)
    spec = (marker.astype(np.float32).view(np.uint32) | sign).view(np.float32)
    return magnitude.view(np.int32), spec


def lmul_formula(x: np.ndarray, y: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """L-Mul of finite nonzero operands by the formula in float64 (mantissa carry included), for cross-checks."""
    xr = round_to_format(x, fmt).astype(np.float64)
    yr = round_to_format(y, fmt).astype(np.float64)
    x_frac, x_exp = np.frexp(np.abs(xr))
    y_frac, y_exp = np.frexp(np.abs(yr))
    # frexp gives |x| = f·2^e with f in [0.5, 1): 1 + xm = 2f and xe = e - 1.
    mantissa_sum = (2 * x_frac - 1) + (2 * y_frac - 1) + 2.0**-fmt.offset_exponent
    exponent = (x_exp - 1) + (y_exp - 1)
    # The adder carries floor(t) of the mantissa sum t into the exponent and keeps its fraction.
    carry = np.floor(mantissa_sum)
    value = np.ldexp(1 + mantissa_sum - carry, exponent + carry.astype(np.int64))
    return (np.sign(xr) * np.sign(yr) * value).astype(np.float32)


def exact_product(x: np.ndarray, y: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """The fp8-style reference: both operands rounded to ``fmt``, their product exact (float64)."""
    return round_to_format(x, fmt).astype(np.float64) * round_to_format(y, fmt).astype(np.float64)


def pow2_scale(x: np.ndarray, fmt: FloatFormat) -> np.float32:
    """The power of two s = 2^ceil(log2(max finite |x| / scale_target)) in [2^-126, 2^126]: x / s fits ``fmt``."""
    magnitude = np.abs(np.asarray(x, np.float32))
    largest = np.max(np.where(np.isfinite(magnitude), magnitude, 0), initial=0).astype(np.float32)
    ratio = np.clip(largest / np.float32(fmt.scale_target), np.float32(2.0**-126), np.float32(2.0**126))
    bits = (np.asarray(ratio, np.float32).view(np.uint32) + ((1 << FLOAT32_MANTISSA_BITS) - 1)) & FLOAT32_EXPONENT_MASK
    return np.asarray(bits, np.uint32).view(np.float32)[()]


def lmul_matmul(x: np.ndarray, w: np.ndarray, fmt: FloatFormat, scaled: bool = True, rows: int = 64) -> np.ndarray:
    """x [..., K] · w [K, N] with L-Mul products summed in float64; per-tensor power-of-two scales if ``scaled``."""
    sx, sw = (pow2_scale(x, fmt), pow2_scale(w, fmt)) if scaled else (np.float32(1), np.float32(1))
    flat = (np.asarray(x, np.float32) / sx).reshape(-1, w.shape[0])
    ws = np.asarray(w, np.float32) / sw
    out = np.empty((flat.shape[0], w.shape[1]), np.float64)
    for start in range(0, flat.shape[0], rows):
        block = flat[start : start + rows]
        out[start : start + rows] = lmul(block[:, :, None], ws[None], fmt).astype(np.float64).sum(axis=1)
    return (out * (np.float64(sx) * np.float64(sw))).reshape(*np.shape(x)[:-1], w.shape[1])


def exact_matmul(x: np.ndarray, w: np.ndarray, fmt: FloatFormat, scaled: bool = True) -> np.ndarray:
    """x · w with both operands rounded to ``fmt`` (per-tensor power-of-two scales if ``scaled``), in float64."""
    sx, sw = (pow2_scale(x, fmt), pow2_scale(w, fmt)) if scaled else (np.float32(1), np.float32(1))
    xr = round_to_format(np.asarray(x, np.float32) / sx, fmt).astype(np.float64)
    wr = round_to_format(np.asarray(w, np.float32) / sw, fmt).astype(np.float64)
    return (xr @ wr) * (np.float64(sx) * np.float64(sw))


def stays_in_float32(fmt: FloatFormat) -> bool:
    """Whether every L-Mul of two operand codes is a float32 normal: no underflow or overflow case to handle."""
    smallest = min(fmt.min_step if fmt.subnormals else fmt.min_normal, ZERO_STAND_IN)
    # 2^(xe+ye) <= L-Mul(x, y) < 2^(xe+ye+2): bound both ends by the smallest and largest operands.
    return smallest * smallest >= 2.0**-126 and 4 * fmt.max_finite * fmt.max_finite < 2.0**128
