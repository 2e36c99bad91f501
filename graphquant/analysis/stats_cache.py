"""Calibration statistics reused across passes and runs: keyed by tensor name and the content of its producers.

A tensor's key is a digest of everything that computes it: the ops, attributes and stored tensors of its producer
cone back to the graph inputs. A pass that rewrites any of them changes the key; a pass that leaves them alone, or a
second pipeline over the same graph (the auto search builds several), finds the statistics already collected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.runner import RecordedOutputs, shares_weights
from graphquant.analysis.stats import CalibrationStats, TensorStats
from graphquant.scratch import scratch_folder

# A strided tensor is copied this many bytes at a time to be digested.
DIGEST_SLICE_BYTES = 16 << 20
# Stands for a requested tensor that calibration does not reduce (not floating point): known absent, not a miss.
_NOT_REDUCED = None


@dataclasses.dataclass
class _Reference:
    """Outputs of the float model to record in the first calibration run, where that run computes them alike."""

    keys: dict[str, tuple[str, str]]
    opsets: dict[str, int]
    files: contextlib.ExitStack = dataclasses.field(default_factory=contextlib.ExitStack)
    outputs: RecordedOutputs | None = None
    pending: bool = True


class CachingCalibrator(Calibrator):
    """A Calibrator that runs the model only for tensors whose statistics it has not collected for this content."""

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._cache: dict[tuple[str, str], TensorStats | None] = {}
        self._tensor_digests = TensorDigests()
        self.runs = 0
        self.hits = 0
        self._batches = 0
        self._reference: _Reference | None = None

    def expect_reference(self, model: ir.Model, names: Sequence[str]) -> None:
        """Record the named outputs of ``model`` (the float original) in the first calibration run, for validation.

        Only a model that runs unoptimized (shares_weights) qualifies, and the run records them only where it is the
        same computation: every named value has the same producer cone (content digest) in the calibrated graph, with
        the same opsets, and that graph runs unoptimized too. onnxruntime's graph optimizations depend on which
        values a session outputs, so optimized sessions could round differently.
        """
        self.drop_reference()
        if shares_weights(model) and self.cluster is None:
            keys = value_digests(model.graph, names, self._tensor_digests)
            self._reference = _Reference(keys, dict(model.opset_imports))

    def reference_outputs(self) -> RecordedOutputs | None:
        """The float model's outputs recorded during calibration (see expect_reference), if they were."""
        return None if self._reference is None else self._reference.outputs

    def drop_reference(self) -> None:
        """Remove the recorded outputs' file and stop expecting any."""
        if self._reference is not None:
            self._reference.files.close()
        self._reference = None

    def _recording(self, model: ir.Model, keys: Mapping[str, tuple[str, str]]) -> RecordedOutputs | None:
        """Where the first calibration run records the expected reference outputs: only a run that computes them.

        ``keys`` holds the calibrated graph's digests of (at least) the expected names.
        """
        reference = self._reference
        if reference is None or not reference.pending:
            return None
        reference.pending = False
        same = (
            shares_weights(model)
            and dict(model.opset_imports) == reference.opsets
            and all(keys[name] == key for name, key in reference.keys.items())
        )
        if not same:
            return None
        folder = reference.files.enter_context(scratch_folder())
        recording = RecordedOutputs(folder, list(reference.keys))
        reference.outputs = reference.files.enter_context(contextlib.closing(recording))
        return reference.outputs

    def collect(
        self,
        model: ir.Model,
        tensor_names: Sequence[str],
        sample_rows: int = 0,
        gram_names: Sequence[str] = (),
        observe: Callable[[str, np.ndarray], None] | None = None,
        histogram: bool = True,
    ) -> CalibrationStats:
        """The statistics of the named tensors, calibrating (once, for all missing ones) only what is not cached.

        An ``observe`` callback needs every batch, so it makes the run calibrate all the named tensors afresh. Derived
        statistics (see ``record``) answer only where ``histogram`` is False.
        """
        names = sorted(set(tensor_names))
        expected = list(self._reference.keys) if self._reference is not None and self._reference.pending else []
        keys = value_digests(model.graph, [*names, *expected], self._tensor_digests)  # one walk for both
        usable = observe is None
        missing = [
            name
            for name in names
            if not (usable and self._usable(keys[name], sample_rows, name in gram_names, histogram))
        ]
        self.hits += len(names) - len(missing)
        if missing:
            self.runs += 1
            grams = [name for name in gram_names if name in missing]
            recording = self._recording(model, keys) if observe is None else None
            fresh = super().collect(model, missing, sample_rows, grams, observe, recording=recording)
            self._batches = fresh.batches
            for name in missing:
                self._cache[keys[name]] = fresh.tensors.get(name, _NOT_REDUCED)
        stats = CalibrationStats(batches=self._batches)
        for name in names:
            cached = self._cache[keys[name]]
            if cached is not None:
                stats.tensors[name] = cached
        return stats

    def record(self, model: ir.Model, derived: Mapping[str, TensorStats]) -> None:
        """Keep statistics of tensors an exact rewrite made (derived from the ones before it) under their content keys.

        An entry already collected for the same content stays: measured statistics win over derived ones.
        """
        keys = value_digests(model.graph, list(derived), self._tensor_digests)
        for name, stats in derived.items():
            self._cache.setdefault(keys[name], stats)

    def first_collected(self, name: str) -> TensorStats | None:
        """The statistics first collected under this tensor name in the run (before later passes rewrote it), if any."""
        return next((stats for (key, _), stats in self._cache.items() if key == name and stats is not None), None)

    def _usable(self, key: tuple[str, str], sample_rows: int, gram: bool, histogram: bool) -> bool:
        """Whether a cached entry answers the request exactly (the same row sample; a Gram matrix and an exact
        histogram where asked)."""
        if key not in self._cache:
            return False
        cached = self._cache[key]
        if cached is None:
            return True
        return (
            (not sample_rows or cached.sample_limit == sample_rows)
            and (not gram or cached.gram is not None)
            and (not histogram or cached.exact_histogram)
        )


class TensorDigests:
    """Digests of stored tensors, each computed once while the tensor lives (onnx_ir tensors are immutable)."""

    def __init__(self) -> None:
        self._known: dict[int, tuple[weakref.ref[ir.TensorProtocol], str]] = {}

    def __call__(self, tensor: ir.TensorProtocol) -> str:
        """The digest of the tensor's dtype, shape and bytes."""
        key = id(tensor)
        known = self._known.get(key)
        if known is not None and known[0]() is tensor:
            return known[1]
        digest = _tensor_digest(tensor)
        try:
            alive = weakref.ref(tensor, lambda _, key=key: self._known.pop(key, None))
        except TypeError:  # a tensor class without weak references: digested at every use
            return digest
        self._known[key] = (alive, digest)
        return digest


def value_digests(
    graph: ir.Graph, names: Sequence[str], tensors: TensorDigests | None = None
) -> dict[str, tuple[str, str]]:
    """(name, digest of the producer cone) of each named value of the graph; unknown names get a unique key."""
    values = {value.name: value for value in graph.inputs}
    values.update((output.name, output) for node in graph for output in node.outputs)
    values.update(graph.initializers)
    memo: dict[int, str] = {}
    digests = tensors if tensors is not None else TensorDigests()
    return {
        name: (name, _digest(values[name], memo, digests) if name in values else uuid.uuid4().hex) for name in names
    }


def _digest(value: ir.Value, memo: dict[int, str], tensors: TensorDigests) -> str:
    """The digest of one value, its producers first (an explicit stack: graphs are deeper than Python's recursion)."""
    stack = [value]
    while stack:
        current = stack[-1]
        if id(current) in memo:
            stack.pop()
            continue
        producer = current.producer()
        pending = [] if producer is None else [v for v in producer.inputs if v is not None and id(v) not in memo]
        if pending:
            stack.extend(pending)
            continue
        memo[id(current)] = _value_digest(current, producer, memo, tensors)
        stack.pop()
    return memo[id(value)]


def _value_digest(value: ir.Value, producer: ir.Node | None, memo: dict[int, str], tensors: TensorDigests) -> str:
    """A value's digest from its producer's op, attributes and input digests, or from its stored tensor or input."""
    hasher = hashlib.blake2b(digest_size=16)
    stored = None if producer is None else _as_stored(producer)
    if stored is not None:  # keyed as the initializer that fold-constants makes of it
        hasher.update(b"tensor" + tensors(stored).encode())
        return hasher.hexdigest()
    if producer is None:
        if value.const_value is not None:
            hasher.update(b"tensor" + tensors(value.const_value).encode())
        else:
            hasher.update(f"input {value.name} {value.dtype} {value.shape}".encode())
        return hasher.hexdigest()
    hasher.update(f"{producer.domain}::{producer.op_type}::{producer.overload}#{value.index()}".encode())
    for name, attribute in sorted(producer.attributes.items()):
        hasher.update(f"{name}={_attribute_text(attribute, tensors)}".encode())
    for argument in producer.inputs:
        hasher.update(b"-" if argument is None else memo[id(argument)].encode())
    return hasher.hexdigest()


def _as_stored(node: ir.Node) -> ir.TensorProtocol | None:
    """The tensor a node makes from stored values without arithmetic, as fold-constants stores it; else None.

    A Constant's ``value`` (lifted to an initializer) and a Transpose of a stored tensor (a tied embedding that
    lm_head reads): both move values only, so this tensor is exactly what onnxruntime computes.
    """
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Constant" and set(node.attributes) == {"value"}:
        attribute = node.attributes["value"]
        return attribute.value if attribute.type == ir.AttributeType.TENSOR else None
    if node.op_type != "Transpose" or len(node.inputs) != 1:
        return None
    source = node.inputs[0]
    if source is None or source.const_value is None or source.is_graph_input():
        return None
    perm = node.attributes.get_ints("perm")
    return ir.Tensor(np.transpose(source.const_value.numpy(), perm), dtype=source.const_value.dtype)  # a view


def _attribute_text(attribute: ir.Attr, tensors: TensorDigests) -> str:
    """An attribute as text; a tensor by its digest; a subgraph by a fresh token (never matched: no reuse there)."""
    if attribute.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        return uuid.uuid4().hex
    if attribute.type == ir.AttributeType.TENSOR:
        return tensors(attribute.value)
    return repr(attribute.value)


def _tensor_digest(tensor: ir.TensorProtocol) -> str:
    """The digest of a tensor's dtype, shape and bytes in C order, read a slice of rows at a time (without a copy
    where they are contiguous; a strided view, such as a transpose, is copied one slice at a time)."""
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(f"{tensor.dtype} {tensor.shape}".encode())
    array = tensor.numpy()
    if array.dtype == object:
        hasher.update(repr(np.asarray(array).tolist()).encode())
        return hasher.hexdigest()
    rows = array.reshape(1, -1) if array.ndim == 0 else array
    step = max(1, DIGEST_SLICE_BYTES // max(1, rows[0].nbytes))
    for start in range(0, rows.shape[0], step):
        hasher.update(np.ascontiguousarray(rows[start : start + step]).reshape(-1).view(np.uint8))
    return hasher.hexdigest()
