"""Streaming, mergeable activation statistics: per-channel ranges and a fixed-edge histogram."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

# Histogram of |x| on fixed log2-spaced edges, so that any two histograms merge by addition.
# Bin 0 holds |x| below 2**HIST_MIN_EXP (zeros included); the others are 1/BINS_PER_OCTAVE octave wide.
BINS_PER_OCTAVE = 16
HIST_MIN_EXP = -40
HIST_MAX_EXP = 40
HIST_BINS = (HIST_MAX_EXP - HIST_MIN_EXP) * BINS_PER_OCTAVE + 1
# Batch statistics are reduced in row slices of about this many values, so their float64 temporaries stay small.
CHUNK_ELEMENTS = 1 << 16
# float32 values that agree in all but their low TABLE_SHIFT bits share a histogram bin, except the few runs a bin edge
# cuts: the bins are read from a table of those runs, and only the values in a cut run are binned by their log2.
TABLE_SHIFT = 13


@dataclasses.dataclass
class TensorStats:
    """Running statistics of one tensor, reduced over every axis but the last (the channel axis)."""

    channel_min: np.ndarray
    channel_max: np.ndarray
    abs_histogram: np.ndarray
    count: int
    channel_sum: np.ndarray | None = None
    channel_sum_squares: np.ndarray | None = None
    nonfinite: int = 0
    sample: np.ndarray | None = None
    sample_limit: int = 0
    gram: np.ndarray | None = None
    exact_histogram: bool = True

    @classmethod
    def from_batch(cls, values: np.ndarray, sample_rows: int = 0, gram: bool = False) -> TensorStats:
        """Statistics of one batch; non-finite values are counted and left out; keeps up to ``sample_rows`` rows.

        With ``gram``, also the channel Gram matrix X^T X (GPTQ's Hessian, summed over rows, so it streams).
        """
        data = np.asarray(values, dtype=np.float32)
        if data.ndim == 0:
            data = data.reshape(1)
        rows = data.reshape(-1, data.shape[-1])
        if gram or not _all_finite(rows):
            return cls._from_copied_rows(rows, sample_rows, gram)
        low, high = (rows.min(axis=0), rows.max(axis=0)) if rows.shape[0] else _empty_range(rows.shape[1])
        histogram, total, squares = _chunked_sums(rows)
        return cls(
            channel_min=low.astype(np.float64),
            channel_max=high.astype(np.float64),
            abs_histogram=histogram,
            count=int(rows.shape[0]),
            channel_sum=total,
            channel_sum_squares=squares,
            sample=_evenly_spaced(rows, sample_rows) if sample_rows else None,
            sample_limit=sample_rows,
        )

    @classmethod
    def _from_copied_rows(cls, rows: np.ndarray, sample_rows: int, gram: bool) -> TensorStats:
        """Statistics from a float64 copy of the rows: for non-finite values and for the Gram matrix."""
        finite = np.isfinite(rows)
        nonfinite = int(rows.size - np.count_nonzero(finite))
        clean = np.where(finite, rows, 0).astype(np.float64) if nonfinite else rows.astype(np.float64)
        if nonfinite:
            low = np.where(finite, rows, np.inf).min(axis=0)
            high = np.where(finite, rows, -np.inf).max(axis=0)
            magnitudes = np.abs(rows[finite])
        else:
            low, high = (rows.min(axis=0), rows.max(axis=0)) if rows.shape[0] else _empty_range(rows.shape[1])
            magnitudes = np.abs(rows).ravel()
        return cls(
            channel_min=low.astype(np.float64),
            channel_max=high.astype(np.float64),
            abs_histogram=_histogram(magnitudes),
            count=int(rows.shape[0]),
            channel_sum=clean.sum(axis=0),
            channel_sum_squares=np.square(clean).sum(axis=0),
            nonfinite=nonfinite,
            sample=_evenly_spaced(rows[np.all(finite, axis=1)], sample_rows) if sample_rows else None,
            sample_limit=sample_rows,
            gram=clean.T @ clean if gram else None,
        )

    def merge(self, other: TensorStats) -> TensorStats:
        """Combine two statistics of the same tensor (associative and commutative)."""
        if self.channel_min.shape != other.channel_min.shape:
            raise ValueError(f"channel counts differ: {self.channel_min.shape} vs {other.channel_min.shape}")
        return TensorStats(
            channel_min=np.minimum(self.channel_min, other.channel_min),
            channel_max=np.maximum(self.channel_max, other.channel_max),
            abs_histogram=self.abs_histogram + other.abs_histogram,
            count=self.count + other.count,
            channel_sum=_add(self.channel_sum, other.channel_sum),
            channel_sum_squares=_add(self.channel_sum_squares, other.channel_sum_squares),
            nonfinite=self.nonfinite + other.nonfinite,
            sample=_merge_samples(
                self.sample, self.count, other.sample, other.count, max(self.sample_limit, other.sample_limit)
            ),
            sample_limit=max(self.sample_limit, other.sample_limit),
            gram=_add(self.gram, other.gram),
        )

    def affine(self, scale: np.ndarray, offset: np.ndarray, histogram: bool = True) -> TensorStats:
        """The statistics of x*scale + offset per channel (scale >= 0), for the tensor an exact rewrite made.

        With ``histogram``, where the row sample holds every row seen, they are reduced afresh from the transformed
        rows (exact up to float rounding). Otherwise the ranges, sums and sample are transformed, the Gram matrix is
        dropped and the histogram is kept untransformed, marked inexact.
        """
        gain, shift = np.asarray(scale, np.float32), np.asarray(offset, np.float32)
        sample = None if self.sample is None else self.sample * gain + shift
        if histogram and self.holds_every_row and self.gram is None:
            return TensorStats.from_batch(sample, self.sample_limit)
        wide, moved = gain.astype(np.float64), shift.astype(np.float64)
        with np.errstate(invalid="ignore"):  # 0 * inf in a channel that only ever held NaN/Inf
            low = np.where(wide > 0, self.channel_min * wide, 0.0) + moved
            high = np.where(wide > 0, self.channel_max * wide, 0.0) + moved
        return dataclasses.replace(
            self,
            channel_min=low,
            channel_max=high,
            channel_sum=None if self.channel_sum is None else self.channel_sum * wide + moved * self.count,
            channel_sum_squares=None
            if self.channel_sum is None or self.channel_sum_squares is None
            else self.channel_sum_squares * wide**2 + 2 * wide * moved * self.channel_sum + moved**2 * self.count,
            sample=sample,
            gram=None,
            exact_histogram=False,
        )

    @property
    def holds_every_row(self) -> bool:
        """Whether the row sample is every row seen (none left out as NaN/Inf, none thinned away)."""
        return self.sample is not None and self.nonfinite == 0 and self.sample.shape[0] == self.count

    def channel_mean_square(self) -> np.ndarray:
        """Per-channel E[x^2]."""
        return self.channel_mean_square_after_shift(np.zeros_like(self.channel_min))

    def channel_mean_square_after_shift(self, shift: np.ndarray) -> np.ndarray:
        """Per-channel E[(x - shift)^2] = E[x^2] - 2·shift·E[x] + shift^2 over the rows seen."""
        if self.channel_sum is None or self.channel_sum_squares is None or self.count == 0:
            raise ValueError("these statistics hold no channel sums")
        mean = self.channel_sum / self.count
        return self.channel_sum_squares / self.count - 2 * shift * mean + shift**2

    @property
    def has_finite_values(self) -> bool:
        """Whether any finite value was seen."""
        return bool(np.any(self.channel_min <= self.channel_max))

    @property
    def channel_absmax(self) -> np.ndarray:
        """Per-channel max |x|; 0 for channels with no finite value."""
        absmax = np.maximum(np.abs(self.channel_min), np.abs(self.channel_max))
        return np.where(np.isfinite(absmax), absmax, 0.0)

    @property
    def absmax(self) -> float:
        """Per-tensor max |x|."""
        return float(self.channel_absmax.max(initial=0.0))

    @property
    def minimum(self) -> float:
        """Per-tensor minimum over finite values."""
        return float(self.channel_min.min(initial=np.inf))

    @property
    def maximum(self) -> float:
        """Per-tensor maximum over finite values."""
        return float(self.channel_max.max(initial=-np.inf))

    def abs_percentile(self, percentile: float) -> float:
        """Upper bound of the given percentile of |x|, within one histogram bin (about 4.4%)."""
        total = int(self.abs_histogram.sum())
        if total == 0:
            return 0.0
        rank = np.searchsorted(np.cumsum(self.abs_histogram), percentile / 100.0 * total)
        upper_edge = 2.0 ** (HIST_MIN_EXP + int(rank) / BINS_PER_OCTAVE)
        return float(min(upper_edge, self.absmax))


def _row_chunks(rows: np.ndarray) -> list[np.ndarray]:
    """The rows in consecutive slices of about CHUNK_ELEMENTS values (one slice for a single channel)."""
    # With one channel, numpy sums the rows pairwise, which slices would change: that tensor is small anyway.
    step = rows.shape[0] if rows.shape[1] == 1 else max(1, CHUNK_ELEMENTS // max(rows.shape[1], 1))
    return [rows[start : start + step] for start in range(0, rows.shape[0], max(step, 1))]


def _all_finite(rows: np.ndarray) -> bool:
    """Whether every value is finite, checked slice by slice (no full-size mask)."""
    return all(bool(np.isfinite(chunk).all()) for chunk in _row_chunks(rows))


def _chunked_sums(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The |x| histogram and the float64 per-channel sums of x and x², in slices bounded by CHUNK_ELEMENTS.

    Each slice's float64 sums continue the running ones row by row, in the order one float64 copy of all rows
    would add them, so the results are bit-identical to that copy's.
    """
    histogram = np.zeros(HIST_BINS, np.int64)
    total = squares = np.zeros(rows.shape[1], np.float64)
    for index, chunk in enumerate(_row_chunks(rows)):
        histogram += _histogram(np.abs(chunk).ravel())
        wide = chunk.astype(np.float64)
        total, squares = _continued(total, wide, index), _continued(squares, np.square(wide), index)
    return histogram, total, squares


def _continued(running: np.ndarray, chunk: np.ndarray, index: int) -> np.ndarray:
    """The running per-channel sum continued over the chunk's rows (the first chunk starts it)."""
    if index == 0:
        return chunk.sum(axis=0)
    return np.add.reduce(np.concatenate([running[None], chunk]), axis=0)


def _add(first: np.ndarray | None, second: np.ndarray | None) -> np.ndarray | None:
    """Sum of two optional arrays (None if either is missing)."""
    return None if first is None or second is None else first + second


def _evenly_spaced(rows: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` rows taken at even strides (deterministic)."""
    if rows.shape[0] <= limit:
        return rows.copy()
    return rows[np.linspace(0, rows.shape[0] - 1, limit).round().astype(np.int64)]


def _merge_samples(
    first: np.ndarray | None, first_count: int, second: np.ndarray | None, second_count: int, limit: int
) -> np.ndarray | None:
    """Merge two row samples under ``limit`` rows, each side weighted by the rows it stands for."""
    if first is None or second is None:
        return first if second is None else second
    if first.shape[0] + second.shape[0] <= limit:
        return np.concatenate([first, second])
    share = round(limit * first_count / max(first_count + second_count, 1))
    return np.concatenate([_evenly_spaced(first, share), _evenly_spaced(second, limit - share)])


def _empty_range(channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The neutral element of (min, max) for a tensor with no rows."""
    return np.full(channels, np.inf), np.full(channels, -np.inf)


def _histogram(magnitudes: np.ndarray) -> np.ndarray:
    """Counts of |x| (float32) on the fixed log2 edges: each value's bin read from the table by its top bits, the
    values of runs a bin edge cuts binned by their log2 (the same bins as _log2_bins of every value)."""
    assert magnitudes.dtype == np.float32, magnitudes.dtype
    values = np.ascontiguousarray(magnitudes).reshape(-1)
    bins = np.take(_bin_table(), (values.view(np.uint32) >> TABLE_SHIFT).astype(np.intp))
    cut = bins < 0
    if cut.any():
        bins[cut] = _log2_bins(values[cut])
    return np.bincount(bins, minlength=HIST_BINS).astype(np.int64)


def _log2_bins(magnitudes: np.ndarray) -> np.ndarray:
    """The bin of each |x|: bin 0 below 2**HIST_MIN_EXP (and for NaN/Inf), then 1/BINS_PER_OCTAVE octave each."""
    with np.errstate(divide="ignore", invalid="ignore"):  # log2(0) = -inf; its cast is replaced just below
        exponents = np.log2(magnitudes.astype(np.float64))
        bins = np.floor((exponents - HIST_MIN_EXP) * BINS_PER_OCTAVE).astype(np.int64) + 1
    return np.clip(np.where(np.isfinite(exponents), bins, 0), 0, HIST_BINS - 1)


@functools.cache
def _bin_table() -> np.ndarray:
    """The bin of every run of float32 bit patterns equal above the low TABLE_SHIFT bits, -1 where an edge cuts it
    (log2 is monotone, so a run whose first and last values share a bin lies wholly in it)."""
    first = np.arange(1 << (32 - TABLE_SHIFT), dtype=np.uint32) << TABLE_SHIFT
    last = first | np.uint32((1 << TABLE_SHIFT) - 1)
    low, high = _log2_bins(first.view(np.float32)), _log2_bins(last.view(np.float32))
    return np.where(low == high, low, -1).astype(np.int16)


@dataclasses.dataclass
class CalibrationStats:
    """Statistics for a set of named tensors; mergeable across data shards."""

    tensors: dict[str, TensorStats] = dataclasses.field(default_factory=dict)
    batches: int = 0

    def update(self, name: str, values: np.ndarray, sample_rows: int = 0, gram: bool = False) -> None:
        """Fold one batch of one tensor into the running statistics."""
        batch_stats = TensorStats.from_batch(values, sample_rows, gram)
        previous = self.tensors.get(name)
        self.tensors[name] = batch_stats if previous is None else previous.merge(batch_stats)

    def merge(self, other: CalibrationStats) -> CalibrationStats:
        """Combine the statistics of two shards."""
        merged = dict(self.tensors)
        for name, stats in other.tensors.items():
            merged[name] = stats if name not in merged else merged[name].merge(stats)
        return CalibrationStats(tensors=merged, batches=self.batches + other.batches)

    def __getitem__(self, name: str) -> TensorStats:
        """The statistics of one tensor."""
        return self.tensors[name]

    def __contains__(self, name: object) -> bool:
        """Whether the tensor was observed."""
        return name in self.tensors

    def save(self, path: str) -> None:
        """Write the statistics as a portable .npz file."""
        arrays: dict[str, np.ndarray] = {"__batches__": np.array(self.batches)}
        for index, (name, stats) in enumerate(sorted(self.tensors.items())):
            arrays[f"{index}.name"] = np.array(name)
            for field in dataclasses.fields(TensorStats):
                if getattr(stats, field.name) is not None:
                    arrays[f"{index}.{field.name}"] = np.asarray(getattr(stats, field.name))
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str) -> CalibrationStats:
        """Read statistics written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as archive:
            indices = sorted({key.split(".")[0] for key in archive.files if key != "__batches__"}, key=int)
            tensors = {
                str(archive[f"{i}.name"]): TensorStats(
                    channel_min=archive[f"{i}.channel_min"],
                    channel_max=archive[f"{i}.channel_max"],
                    abs_histogram=archive[f"{i}.abs_histogram"],
                    count=int(archive[f"{i}.count"]),
                    channel_sum=archive.get(f"{i}.channel_sum"),
                    channel_sum_squares=archive.get(f"{i}.channel_sum_squares"),
                    nonfinite=int(archive[f"{i}.nonfinite"]),
                    sample=archive[f"{i}.sample"] if f"{i}.sample" in archive.files else None,
                    sample_limit=int(archive[f"{i}.sample_limit"]),
                    gram=archive[f"{i}.gram"] if f"{i}.gram" in archive.files else None,
                    exact_histogram=bool(archive.get(f"{i}.exact_histogram", True)),
                )
                for i in indices
            }
            return cls(tensors=tensors, batches=int(archive["__batches__"]))
