"""Weight grids: per-channel or block-wise, symmetric or asymmetric, with an output-aware clipping search (RTN)."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from graphquant.analysis.layers import Layer
from graphquant.analysis.stats_cache import TensorDigests
from graphquant.quant_spec import QuantSpec, asymmetric_spec, symmetric_spec

# Clip ratios tried per channel or block: the range is shrunk to ratio x (min, max).
CLIP_RATIOS = np.linspace(1.0, 0.5, 21)
# The clip search handles about this many weights at a time (its float32 buffer is as large).
SEARCH_CHUNK_ELEMENTS = 1 << 20
# Searched ranges kept by content digest: the auto search builds several candidates with the same weights and grids.
SEARCH_MEMO_ENTRIES = 1024
_SEARCHED: collections.OrderedDict[str, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
# Stored weights' digests, each computed once while its tensor lives: the memo's keys without rehashing the weight.
WEIGHT_DIGESTS = TensorDigests()
# Weight codes kept by digest inside remembered_codes(), up to this many bytes: the auto search lowers the same
# weights on the same grids in several candidates.
CODES_MEMO_BYTES = 256 << 20
_CODES: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
_REMEMBERING_CODES = [False]


@dataclasses.dataclass(frozen=True)
class WeightScheme:
    """How a weight is gridded: bits, symmetric or not, block size along the input channels (None = per channel)."""

    bits: int
    symmetric: bool = True
    block_size: int | None = None
    clip_search: bool = False

    def describe(self, layer: Layer) -> str:
        """A short label such as 'W4 asym block 32 clip-searched' (symmetric is the unmarked default)."""
        granularity = f"block {self.block_size}" if self.blocked(layer) else "per-channel"
        if layer.out_axis is None:
            granularity = "per-tensor (grouped ConvTranspose: one DequantizeLinear axis cannot follow its channels)"
        label = f"W{self.bits}{'' if self.symmetric else ' asym'} {granularity}"
        return label + (" clip-searched" if self.clip_search else "")

    def blocked(self, layer: Layer) -> bool:
        """Whether this layer gets blocks: 2-D weights, and Conv weights whose blocks fit along axis 1.

        A Conv block runs over ``block_size`` input channels at one kernel tap (opset-21 DequantizeLinear blocks on
        axis 1 of [C_out, C_in/group, k...]), so it needs 1x1 kernels or C_in/group a multiple of the block size;
        other Conv weights (depthwise ones included) stay per output channel. ConvTranspose stays per channel.
        """
        if self.block_size is None:
            return False
        weight = layer.weight_array
        if weight.ndim == 2:
            return True
        taps, channels = int(np.prod(weight.shape[2:])), weight.shape[1]
        return layer.node.op_type == "Conv" and channels > 1 and (taps == 1 or channels % self.block_size == 0)


def _tap_major_axes(layer: Layer) -> tuple[int, ...]:
    """The weight axes in in_major order: output channel, then the kernel taps, then the input channel."""
    ndim = layer.weight_array.ndim
    assert layer.out_axis is not None
    return (layer.out_axis, *range(2, ndim), layer.in_axis)


def in_major(layer: Layer, dtype: type[np.floating] = np.float64) -> np.ndarray:
    """The weight as [rows along the input channels, output channels], a view where it can.

    A Conv/ConvTranspose weight has C_in/group·taps rows, tap-major ((k..., c) order, the im2col column order of
    analysis/conv_gram.py), so that a block of rows is a block of input channels at one tap. A per-tensor weight
    (out_axis None, e.g. a grouped ConvTranspose) is one column.
    """
    weight = layer.weight_array.astype(dtype, copy=False)
    if layer.out_axis is None:
        return weight.reshape(-1, 1)
    if weight.ndim == 2:
        return weight if layer.in_axis == 0 else weight.T
    return np.transpose(weight, _tap_major_axes(layer)).reshape(weight.shape[layer.out_axis], -1).T


def from_in_major(layer: Layer, matrix: np.ndarray) -> np.ndarray:
    """The inverse of in_major: a [rows, output channels] matrix back in the layout of the layer's weight."""
    shape = layer.weight_array.shape
    if layer.out_axis is None:
        return matrix.reshape(shape)
    if len(shape) == 2:
        return matrix if layer.in_axis == 0 else matrix.T
    axes = _tap_major_axes(layer)
    return np.transpose(matrix.T.reshape([shape[axis] for axis in axes]), np.argsort(axes))


def in_major_rows(layer: Layer) -> int:
    """The number of rows of in_major(layer)."""
    weight = layer.weight_array
    if layer.out_axis is None:
        return weight.size
    if weight.ndim == 2:
        return weight.shape[layer.in_axis]
    return weight.size // weight.shape[layer.out_axis]


def row_energy(layer: Layer, channel_mean_square: np.ndarray | None) -> np.ndarray:
    """E[x_j^2] for each row of in_major(layer) as a column vector; uniform without calibration and for Conv."""
    rows = in_major_rows(layer)
    if channel_mean_square is None or layer.weight_array.ndim != 2:
        return np.ones((rows, 1))
    return np.maximum(np.asarray(channel_mean_square, np.float64), 0.0)[:, None]


def block_rows(layer: Layer, scheme: WeightScheme) -> int:
    """Rows of in_major(layer) per block: the block size, or all rows for per-channel grids."""
    return scheme.block_size if scheme.block_size is not None and scheme.blocked(layer) else in_major_rows(layer)


def fit_weight_spec(layer: Layer, scheme: WeightScheme, energy: np.ndarray) -> QuantSpec:
    """The spec for the layer's weight, in the weight's own layout, fitted to in_major(layer)."""
    low, high = fit_ranges(
        in_major(layer, np.float32),
        energy,
        scheme.bits,
        scheme.symmetric,
        block_rows(layer, scheme),
        scheme.clip_search,
        in_major_digest(layer),
    )
    return spec_from_ranges(layer, scheme, low, high)


@contextlib.contextmanager
def remembered_codes() -> Iterator[None]:
    """Within it stored_codes keeps its results by content; leaving the outermost one drops them."""
    outer = _REMEMBERING_CODES[0]
    _REMEMBERING_CODES[0] = True
    try:
        yield
    finally:
        _REMEMBERING_CODES[0] = outer
        if not outer:
            _CODES.clear()


def stored_codes(spec: QuantSpec, value: ir.Value) -> np.ndarray:
    """spec.quantize of the value's constant, memoized by the tensor's and the spec's digests inside
    remembered_codes() (a copy is returned)."""
    tensor = value.const_value
    assert tensor is not None
    if not _REMEMBERING_CODES[0]:
        return spec.quantize(tensor.numpy())
    hasher = hashlib.blake2b(repr(spec.key[:5]).encode(), digest_size=16)
    hasher.update(spec.key[5] + spec.key[6] + WEIGHT_DIGESTS(tensor).encode())
    key = hasher.hexdigest()
    if key not in _CODES:
        _CODES[key] = spec.quantize(tensor.numpy())
        while sum(codes.nbytes for codes in _CODES.values()) > CODES_MEMO_BYTES and len(_CODES) > 1:
            _CODES.popitem(last=False)
    _CODES.move_to_end(key)
    return _CODES[key].copy()


def in_major_digest(layer: Layer) -> str:
    """A digest of in_major(layer) in float32: the weight tensor's (see WEIGHT_DIGESTS) and the layer's axes."""
    tensor = layer.weight.const_value
    assert tensor is not None
    return f"{WEIGHT_DIGESTS(tensor)} in-major {layer.in_axis} {layer.out_axis} float32"


def spec_from_ranges(layer: Layer, scheme: WeightScheme, low: np.ndarray, high: np.ndarray) -> QuantSpec:
    """The spec of per-(block, column) ranges [blocks, N] of in_major(layer), laid out along the weight's axes."""
    block_size = block_rows(layer, scheme) if scheme.blocked(layer) else None
    if block_size is None:
        low, high, axis = low[0], high[0], layer.out_axis
        if axis is None:  # a per-tensor weight is one column of in_major(layer)
            low, high = low.reshape(()), high.reshape(())
    elif layer.weight_array.ndim > 2:  # tap-major blocks [(k..., c-block), C_out] -> [C_out, c-block, k...]
        kernel = layer.weight_array.shape[2:]
        low, high = (np.moveaxis(r.reshape(*kernel, -1, r.shape[-1]), (-1, -2), (0, 1)) for r in (low, high))
        axis = 1
    elif layer.in_axis == 0:
        axis = 0
    else:
        low, high, axis = low.T, high.T, 1
    if scheme.symmetric:
        return symmetric_spec(np.maximum(-low, high), scheme.bits, axis=axis, block_size=block_size)
    return asymmetric_spec(low, high, scheme.bits, axis=axis, block_size=block_size)


def fit_ranges(
    matrix: np.ndarray,
    energy: np.ndarray,
    bits: int,
    symmetric: bool,
    block: int,
    clip_search: bool,
    digest: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per block of ``block`` rows and per column, the (low, high) range minimizing sum_j E[x_j^2]·(w - q(w))^2.

    Float64 ranges; the search runs on a few columns at a time, so no full float64 copy of a large weight is made.
    ``digest`` stands for the matrix's values in the search memo's key (they are hashed when it is None).
    """
    # Block by block: reduceat would copy a whole unaligned (memory-mapped) weight. A zero-padded last block's zeros
    # only matter through min(., 0) and max(., 0), which follow anyway.
    blocks = [matrix[start : start + block] for start in range(0, matrix.shape[0], block)]
    low = np.minimum(np.stack([rows.min(axis=0) for rows in blocks]).astype(np.float64), 0.0)
    high = np.maximum(np.stack([rows.max(axis=0) for rows in blocks]).astype(np.float64), 0.0)
    if symmetric:
        high = np.maximum(-low, high)
        low = -high
    if not clip_search:
        return low, high
    step = max(1, SEARCH_CHUNK_ELEMENTS // max(1, matrix.shape[0]))
    chunks = [slice(start, start + step) for start in range(0, matrix.shape[1], step)]
    key = _search_key(matrix, chunks, energy, bits, symmetric, block, digest)
    if key not in _SEARCHED:
        weights = _blocked(np.broadcast_to(energy, (matrix.shape[0], 1)), block)[:, :, 0]
        for columns in chunks:
            low[:, columns], high[:, columns] = _clip_search(
                _blocked(matrix[:, columns], block), weights, low[:, columns], high[:, columns], bits, symmetric
            )
        _SEARCHED[key] = (low, high)
        while len(_SEARCHED) > SEARCH_MEMO_ENTRIES:
            _SEARCHED.popitem(last=False)
    _SEARCHED.move_to_end(key)
    return _SEARCHED[key][0].copy(), _SEARCHED[key][1].copy()


def _search_key(
    matrix: np.ndarray,
    chunks: list[slice],
    energy: np.ndarray,
    bits: int,
    symmetric: bool,
    block: int,
    digest: str | None,
) -> str:
    """A digest of everything the clip search's result depends on (the matrix, unless its digest is given, hashed
    a chunk of columns at a time)."""
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(f"{matrix.shape} {matrix.dtype} {bits} {symmetric} {block}".encode())
    hasher.update(np.ascontiguousarray(energy, np.float64).tobytes() + CLIP_RATIOS.tobytes())
    if digest is not None:
        hasher.update(f"given {digest}".encode())
        return hasher.hexdigest()
    for columns in chunks:
        hasher.update(np.ascontiguousarray(matrix[:, columns]).reshape(-1).view(np.uint8))
    return hasher.hexdigest()


def _clip_search(
    blocks: np.ndarray, weights: np.ndarray, low: np.ndarray, high: np.ndarray, bits: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per (block, column) of ``blocks`` [blocks, block, columns], the CLIP_RATIOS range with the least error.

    ``weights`` [blocks, block] are the rows' energies. The candidates are scored in float32, in one buffer.
    """
    best_error = np.full(low.shape, np.inf, np.float32)
    best_ratio = np.ones(low.shape)
    rounded = np.empty_like(blocks)
    for ratio in CLIP_RATIOS:
        step, lowest, highest = _code_bounds(low * ratio, high * ratio, bits, symmetric)
        # round_trip's grid as clip(rint(w / step), -z, qmax - z) · step: the zero point is an integer code.
        np.divide(blocks, step[:, None, :], out=rounded)
        np.rint(rounded, out=rounded)
        np.maximum(rounded, lowest[:, None, :], out=rounded)
        np.minimum(rounded, highest[:, None, :], out=rounded)
        rounded *= step[:, None, :]
        rounded -= blocks
        np.square(rounded, out=rounded)
        error = np.einsum("bk,bkc->bc", weights, rounded)
        better = error < best_error
        best_error[better] = error[better]
        best_ratio[better] = ratio
    return low * best_ratio, high * best_ratio


def _code_bounds(
    low: np.ndarray, high: np.ndarray, bits: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """round_trip's float32 step and the least and largest code (zero point subtracted) per range."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        step = np.maximum(high, 1e-30) / qmax
        bound = np.full(step.shape, float(qmax), np.float32)
        return step.astype(np.float32), -bound, bound
    qmax = 2**bits - 1
    step = np.maximum(high - low, 1e-30) / qmax
    zero_point = np.clip(np.rint(-low / step), 0, qmax)
    return step.astype(np.float32), (-zero_point).astype(np.float32), (qmax - zero_point).astype(np.float32)


def round_trip(values: np.ndarray, low: np.ndarray, high: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    """Quantize and dequantize ``values`` on the grid of the range [low, high] (broadcast against ``values``)."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        step = np.maximum(high, 1e-30) / qmax
        return np.clip(np.rint(values / step), -qmax, qmax) * step
    qmax = 2**bits - 1
    step = np.maximum(high - low, 1e-30) / qmax
    zero_point = np.clip(np.rint(-low / step), 0, qmax)
    return (np.clip(np.rint(values / step) + zero_point, 0, qmax) - zero_point) * step


def _blocked(matrix: np.ndarray, block: int) -> np.ndarray:
    """[rows, columns] -> [blocks, block, columns], zero-padding the last block."""
    rows, columns = matrix.shape
    count = -(-rows // block)
    padded = np.zeros((count * block, columns), dtype=np.float32)
    padded[:rows] = matrix
    return padded.reshape(count, block, columns)


def output_error_ranges(
    matrix: np.ndarray, grams: np.ndarray, bits: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per column of [K, N] weights, the CLIP_RATIOS range minimizing the output error d^T H d (d = w - q(w)).

    ``grams`` holds one [K, K] input Gram per group of columns ([groups, K, K], N a multiple of groups): for a
    depthwise Conv, each channel's 9 or 25 weights against the Gram of its own patches. Returns [1, N] ranges.
    """
    weights = matrix.astype(np.float64)
    hessians = np.repeat(grams, weights.shape[1] // grams.shape[0], axis=0)  # [N, K, K]
    low, high = fit_ranges(weights, np.ones((weights.shape[0], 1)), bits, symmetric, weights.shape[0], False)
    best_error, best_low, best_high = np.full(low.shape, np.inf), low, high
    for ratio in CLIP_RATIOS:
        error = weights - round_trip(weights, low * ratio, high * ratio, bits, symmetric)
        energy = np.einsum("kn,nkl,ln->n", error, hessians, error)[None, :]
        better = energy < best_error
        best_error = np.where(better, energy, best_error)
        best_low = np.where(better, low * ratio, best_low)
        best_high = np.where(better, high * ratio, best_high)
    return best_low, best_high
