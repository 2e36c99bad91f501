"""Check a transformed model against its reference in onnxruntime: cosine, SQNR and max abs error."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TypeVar

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graphquant import progress
from graphquant.analysis import openvino_run
from graphquant.analysis.data import Feed
from graphquant.analysis.runner import RecordedOutputs, open_session, recorded_runs, run_views
from graphquant.errors import InvalidModelError

# The cosine every output must reach against the float model. A whole output counts every position, padding included:
# on all-MiniLM-L6-v2 (dynamo export; 32 calibration and 16 held-out sentences of 32 tokens) os-plus reaches 0.859
# (0.994 on the real tokens, 0.70 on the padding; mean-pooled embeddings 0.995), the lowest of the shipped presets
# (the others 0.960-0.998); on the repo's test models they all reach 0.957 or more. A collapsed model (every code 0,
# a constant output) scores near 0, and NaN/Inf fails apart from this. Below 0.8 among the presets: only w8a8 on a
# test graph with planted 30x outlier channels (0.29).
DEFAULT_MIN_COSINE = 0.8
# Elements compared at a time, in float64 (512 KiB per operand).
COMPARED_CHUNK = 1 << 16

T = TypeVar("T")


class ReferenceLoadError(InvalidModelError):
    """onnxruntime cannot load the reference model of a comparison."""


@dataclasses.dataclass(frozen=True)
class Probe:
    """A tensor compared under its own label: its name in each model; the candidate's codes are dequantized."""

    reference: str
    candidate: str
    scale: float = 1.0
    zero_point: int = 0
    # The candidate's channel order (last axis): its channel j is the reference's channel_order[j].
    channel_order: np.ndarray | None = None

    def dequantize(self, values: np.ndarray) -> np.ndarray:
        """The candidate's float values: (codes - zero point) * scale."""
        return (values.astype(np.float64) - self.zero_point) * self.scale

    def expected(self, values: np.ndarray) -> np.ndarray:
        """The reference's values in the candidate's channel order."""
        return values if self.channel_order is None else np.take(values, self.channel_order, axis=-1)


@dataclasses.dataclass
class TensorComparison:
    """Streaming error metrics of a candidate tensor against its reference (mergeable sums)."""

    dot: float = 0.0
    reference_energy: float = 0.0
    candidate_energy: float = 0.0
    error_energy: float = 0.0
    max_abs_error: float = 0.0
    worst_tolerance_excess: float = -math.inf
    # Candidate elements that are NaN or Inf where the reference is finite; the sums above skip them.
    nonfinite: int = 0

    def update(self, reference: np.ndarray, candidate: np.ndarray, rtol: float, atol: float) -> None:
        """Fold one batch in; shapes must match. Elements where either side is not finite are counted, not summed."""
        ref, cand = np.asarray(reference), np.asarray(candidate)
        if ref.shape != cand.shape:
            raise ValueError(f"shapes differ: reference {ref.shape}, candidate {cand.shape}")
        ref, cand = ref.reshape(-1), cand.reshape(-1)
        # Float64 sums over cache-sized float64 copies: no full-size float64 temporaries of a 49152-wide logits tensor.
        for start in range(0, ref.size, COMPARED_CHUNK):
            chunk = slice(start, start + COMPARED_CHUNK)
            self._update_chunk(ref[chunk], cand[chunk], rtol, atol)
        if self.nonfinite:
            self.worst_tolerance_excess = math.inf

    def _update_chunk(self, ref: np.ndarray, cand: np.ndarray, rtol: float, atol: float) -> None:
        """Fold one flat slice in, summed in float64 (its two copies are also the work buffers)."""
        if not (np.isfinite(ref).all() and np.isfinite(cand).all()):
            finite_ref, finite_cand = np.isfinite(ref), np.isfinite(cand)
            self.nonfinite += int(np.count_nonzero(finite_ref & ~finite_cand))
            finite = finite_ref & finite_cand
            ref, cand = ref[finite], cand[finite]
        ref, cand = ref.astype(np.float64), cand.astype(np.float64)
        error = np.subtract(ref, cand)
        self.dot += float(np.einsum("i,i->", ref, cand))
        self.reference_energy += float(np.einsum("i,i->", ref, ref))
        self.candidate_energy += float(np.einsum("i,i->", cand, cand))
        self.error_energy += float(np.einsum("i,i->", error, error))
        if error.size:
            np.abs(error, out=error)
            self.max_abs_error = max(self.max_abs_error, float(error.max()))
            # (|error| - atol) - rtol·|ref|, in place
            np.subtract(error, atol, out=error)
            np.abs(ref, out=ref)
            np.multiply(ref, rtol, out=ref)
            np.subtract(error, ref, out=error)
            self.worst_tolerance_excess = max(self.worst_tolerance_excess, float(error.max()))

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
            "nonfinite": self.nonfinite,
        }

    def failure(self, min_cosine: float) -> str | None:
        """Why this tensor fails validation (NaN/Inf where the reference is finite, or a low cosine), or None."""
        if self.nonfinite:
            return f"{self.nonfinite} NaN/Inf values where the float model's are finite"
        if not self.cosine >= min_cosine:
            return f"cosine {self.cosine:.5f} against the float model, below the threshold {min_cosine:g}"
        return None


def compare_models(
    reference: ir.Model,
    candidate: ir.Model,
    feeds: Iterable[Feed],
    tensors: Sequence[str] = (),
    rtol: float = 1e-4,
    atol: float = 1e-5,
    probes: Mapping[str, Probe] | None = None,
    labels: tuple[str, str] = ("the reference model", "the candidate model"),
    executor: str = "onnxruntime",
    recorded: RecordedOutputs | None = None,
) -> dict[str, TensorComparison]:
    """Run both models on the same feeds; compare every graph output, the named tensors and the probes.

    ``labels`` name the two models in errors; a reference the executor cannot load raises ReferenceLoadError.
    ``executor`` "openvino" runs both on OpenVINO's CPU plugin: the reference in float32, the candidate with the
    plugin's defaults (as deployed), both loaded at once. ``recorded`` holds the reference's outputs on these feeds,
    recorded by a run of the same computation (CachingCalibrator.expect_reference): onnxruntime's reference run is
    left out where it holds every tensor compared.
    """
    openvino_run.check_executor(executor)
    outputs = [value.name or "" for value in reference.graph.outputs]
    names = outputs + [name for name in dict.fromkeys(tensors) if name not in outputs]
    probes = dict(probes or {})
    if set(probes) & set(names):
        raise ValueError(f"probe labels {sorted(set(probes) & set(names))} are also tensor names")
    comparisons = {name: TensorComparison() for name in [*names, *probes]}
    wanted = (
        list(dict.fromkeys([*names, *(probe.reference for probe in probes.values())])),
        list(dict.fromkeys([*names, *(probe.candidate for probe in probes.values())])),
    )
    if executor == "openvino":
        paired = _openvino_runs(reference, candidate, wanted, feeds, labels)
    elif recorded is not None and recorded.holds(wanted[0]):
        paired = _recorded_runs(recorded, candidate, wanted, labels)
    else:
        paired = _onnxruntime_runs(reference, candidate, wanted, feeds, labels)
    with paired as runs:
        for expected, actual in runs:
            for name in names:
                comparisons[name].update(expected[name], actual[name], rtol, atol)
            for label, probe in probes.items():
                comparisons[label].update(
                    probe.expected(expected[probe.reference]), probe.dequantize(actual[probe.candidate]), rtol, atol
                )
            del expected, actual  # before the next feed runs
    return comparisons


Outputs = dict[str, np.ndarray]


@contextlib.contextmanager
def _onnxruntime_runs(
    reference: ir.Model,
    candidate: ir.Model,
    wanted: tuple[list[str], list[str]],
    feeds: Iterable[Feed],
    labels: tuple[str, str],
) -> Iterator[Iterator[tuple[Outputs, Outputs]]]:
    """Each feed's reference and candidate tensors from onnxruntime, one session at a time.

    The reference's outputs wait on disk while the candidate runs.
    """
    reference_feeds = progress.bar(feeds, "validation: reference", unit="batch")
    with contextlib.ExitStack() as stack:
        recording = recorded_runs(reference, wanted[0], reference_feeds, parked=candidate)
        runs = _enter(stack, recording, labels[0], ReferenceLoadError)
        candidate_session = _enter(stack, open_session(candidate, wanted[1], park=True), labels[1], InvalidModelError)
        yield (
            (dict(zip(wanted[0], recorded)), _run(candidate_session, wanted[1], feed, labels[1]))
            for feed, recorded in progress.bar(runs, "validation: candidate", total=reference_feeds.n, unit="batch")
        )
        del candidate_session  # before open_session reads the parked weights back


@contextlib.contextmanager
def _recorded_runs(
    recorded: RecordedOutputs, candidate: ir.Model, wanted: tuple[list[str], list[str]], labels: tuple[str, str]
) -> Iterator[Iterator[tuple[Outputs, Outputs]]]:
    """Each recorded feed's reference tensors, and the candidate's from onnxruntime on that feed."""
    with contextlib.ExitStack() as stack:
        candidate_session = _enter(stack, open_session(candidate, wanted[1], park=True), labels[1], InvalidModelError)
        yield (
            (dict(zip(wanted[0], outputs)), _run(candidate_session, wanted[1], feed, labels[1]))
            for feed, outputs in progress.bar(recorded.replay(wanted[0]), "validation: candidate", unit="batch")
        )
        del candidate_session  # before open_session reads the parked weights back


@contextlib.contextmanager
def _openvino_runs(
    reference: ir.Model,
    candidate: ir.Model,
    wanted: tuple[list[str], list[str]],
    feeds: Iterable[Feed],
    labels: tuple[str, str],
) -> Iterator[Iterator[tuple[Outputs, Outputs]]]:
    """Each feed's reference (float32) and candidate (OpenVINO's defaults) tensors from OpenVINO's CPU plugin."""
    with contextlib.ExitStack() as stack:
        expected = _enter(
            stack,
            openvino_run.compiled_model(reference, wanted[0], openvino_run.FLOAT32),
            labels[0],
            ReferenceLoadError,
        )
        actual = _enter(stack, openvino_run.compiled_model(candidate, wanted[1]), labels[1], InvalidModelError)
        yield (
            (_run_openvino(expected, wanted[0], feed, labels[0]), _run_openvino(actual, wanted[1], feed, labels[1]))
            for feed in progress.bar(feeds, "validation on OpenVINO", unit="batch")
        )


def _run_openvino(compiled: object, names: Sequence[str], feed: Feed, label: str) -> Outputs:
    """The named tensors for one feed on OpenVINO; a run-time failure names the model by its label."""
    try:
        return openvino_run.run(compiled, names, feed)
    except InvalidModelError as exc:
        raise InvalidModelError(str(exc).replace("the model", label, 1)) from exc


def _enter(
    stack: contextlib.ExitStack,
    manager: contextlib.AbstractContextManager[T],
    label: str,
    error: type[InvalidModelError],
) -> T:
    """Enter a session's context within ``stack``; a load (or recorded run) failure names the model by its label."""
    try:
        return stack.enter_context(manager)
    except InvalidModelError as exc:
        raise error(str(exc).replace("the model", label, 1)) from exc


def _run(session: ort.InferenceSession, names: Sequence[str], feed: Feed, label: str) -> dict[str, np.ndarray]:
    """The named tensors for one feed; onnxruntime's run-time failure names the model by its label."""
    try:
        return dict(zip(names, run_views(session, names, feed)))
    except InvalidModelError as exc:
        raise InvalidModelError(str(exc).replace("the model", label, 1)) from exc
