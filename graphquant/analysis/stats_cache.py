"""Calibration statistics reused across passes and runs: keyed by tensor name and the content of its producers.

A tensor's key is a digest of everything that computes it: the ops, attributes and stored tensors of its producer
cone back to the graph inputs. A pass that rewrites any of them changes the key; a pass that leaves them alone, or a
second pipeline over the same graph (the auto search builds several), finds the statistics already collected.
"""

from __future__ import annotations

import hashlib
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.stats import CalibrationStats, TensorStats

# Stands for a requested tensor that calibration does not reduce (not floating point): known absent, not a miss.
_NOT_REDUCED = None


class CachingCalibrator(Calibrator):
    """A Calibrator that runs the model only for tensors whose statistics it has not collected for this content."""

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._cache: dict[tuple[str, str], TensorStats | None] = {}
        self._tensor_digests = TensorDigests()
        self.runs = 0
        self.hits = 0
        self._batches = 0

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
        keys = value_digests(model.graph, names, self._tensor_digests)
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
            fresh = super().collect(model, missing, sample_rows, grams, observe)
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


def _attribute_text(attribute: ir.Attr, tensors: TensorDigests) -> str:
    """An attribute as text; a tensor by its digest; a subgraph by a fresh token (never matched: no reuse there)."""
    if attribute.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        return uuid.uuid4().hex
    if attribute.type == ir.AttributeType.TENSOR:
        return tensors(attribute.value)
    return repr(attribute.value)


def _tensor_digest(tensor: ir.TensorProtocol) -> str:
    """The digest of a stored tensor's dtype, shape and bytes (read without a copy where they are contiguous)."""
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(f"{tensor.dtype} {tensor.shape}".encode())
    array = np.ascontiguousarray(tensor.numpy())
    hasher.update(repr(array.tolist()).encode() if array.dtype == object else array.reshape(-1).view(np.uint8))
    return hasher.hexdigest()
