"""Check a transformed model against its reference in onnxruntime: cosine, SQNR and max abs error."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from graphquant import progress
from graphquant.analysis.data import Feed
from graphquant.analysis.runner import open_session, recorded_runs, run_views


@dataclasses.dataclass
class TensorComparison:
    """Streaming error metrics of a candidate tensor against its reference (mergeable sums)."""

    dot: float = 0.0
    reference_energy: float = 0.0
    candidate_energy: float = 0.0
    error_energy: float = 0.0
    max_abs_error: float = 0.0
    worst_tolerance_excess: float = -math.inf

    def update(self, reference: np.ndarray, candidate: np.ndarray, rtol: float, atol: float) -> None:
        """Fold one batch in; shapes must match."""
        ref = np.asarray(reference, dtype=np.float64)
        cand = np.asarray(candidate, dtype=np.float64)
        if ref.shape != cand.shape:
            raise ValueError(f"shapes differ: reference {ref.shape}, candidate {cand.shape}")
        error = np.abs(ref - cand)
        self.dot += float(np.sum(ref * cand))
        self.reference_energy += float(np.sum(ref * ref))
        self.candidate_energy += float(np.sum(cand * cand))
        self.error_energy += float(np.sum(error * error))
        if error.size:
            self.max_abs_error = max(self.max_abs_error, float(error.max()))
            excess = float(np.max(error - atol - rtol * np.abs(ref)))
            self.worst_tolerance_excess = max(self.worst_tolerance_excess, excess)

    @property
    def cosine(self) -> float:
        """Cosine similarity of the flattened tensors over all batches."""
        norm = math.sqrt(self.reference_energy * self.candidate_energy)
        return self.dot / norm if norm > 0 else float(self.reference_energy == self.candidate_energy)

    @property
    def sqnr_db(self) -> float:
        """Signal-to-quantization-noise ratio in dB (inf when identical)."""
        if self.error_energy == 0:
            return math.inf
        if self.reference_energy == 0:
            return -math.inf
        return 10.0 * math.log10(self.reference_energy / self.error_energy)

    @property
    def within_tolerance(self) -> bool:
        """Whether every element met |ref - cand| <= atol + rtol * |ref|."""
        return self.worst_tolerance_excess <= 0.0

    def as_dict(self) -> dict[str, float | bool]:
        """The metrics as plain numbers."""
        return {
            "cosine": self.cosine,
            "sqnr_db": self.sqnr_db,
            "max_abs_error": self.max_abs_error,
            "within_tolerance": self.within_tolerance,
        }


def compare_models(
    reference: ir.Model,
    candidate: ir.Model,
    feeds: Iterable[Feed],
    tensors: Sequence[str] = (),
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> dict[str, TensorComparison]:
    """Run both models on the same feeds and compare every graph output and the named tensors."""
    outputs = [value.name or "" for value in reference.graph.outputs]
    names = outputs + [name for name in dict.fromkeys(tensors) if name not in outputs]
    comparisons = {name: TensorComparison() for name in names}
    # One session at a time: the reference's outputs wait on disk while the candidate runs.
    reference_feeds = progress.bar(feeds, "validation: reference", unit="batch")
    with recorded_runs(reference, names, reference_feeds) as runs, open_session(candidate, names) as candidate_session:
        for feed, expected in progress.bar(runs, "validation: candidate", total=reference_feeds.n, unit="batch"):
            actual = run_views(candidate_session, names, feed)
            for name, want, got in zip(names, expected, actual):
                comparisons[name].update(want, got, rtol, atol)
    return comparisons
