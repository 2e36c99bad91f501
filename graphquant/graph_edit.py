"""Small graph-editing helpers on top of onnx_ir, shared by the rewrite and lowering passes."""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from graphquant.scratch import drop_pages

# Values per slice of read_in_slices.
SLICE_ELEMENTS = 1 << 20


class NameScope:
    """Hands out value and node names that are not yet used in a graph."""

    def __init__(self, graph: ir.Graph):
        self.taken: set[str] = set(graph.initializers)
        for value in graph.inputs:
            self.taken.add(value.name or "")
        for node in ir.traversal.RecursiveGraphIterator(graph):
            self.taken.add(node.name or "")
            self.taken.update(value.name or "" for value in node.outputs)

    def fresh(self, base: str) -> str:
        """``base`` if unused, else ``base_1``, ``base_2``, ... ."""
        name, counter = base, 0
        while name in self.taken:
            counter += 1
            name = f"{base}_{counter}"
        self.taken.add(name)
        return name


def add_initializer(
    graph: ir.Graph, names: NameScope, base: str, array: np.ndarray, dtype: ir.DataType | None = None
) -> ir.Value:
    """Register a new initializer holding ``array`` (stored as ``dtype`` if given, e.g. INT4) under a fresh name."""
    name = names.fresh(base)
    tensor = ir.tensor(array, name=name) if dtype is None else ir.tensor(array, dtype=dtype, name=name)
    value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape), const_value=tensor)
    graph.register_initializer(value)
    return value


def insert_after_producer(graph: ir.Graph, value: ir.Value, nodes: list[ir.Node]) -> None:
    """Insert nodes right after the value's producer, or at the graph start for graph inputs."""
    producer = value.producer()
    if producer is not None and producer.graph is graph:
        graph.insert_after(producer, nodes)
    elif len(graph):
        graph.insert_before(graph[0], nodes)
    else:
        graph.extend(nodes)


def remove_if_unused(graph: ir.Graph, value: ir.Value) -> bool:
    """Drop an initializer that nothing reads any more, unmapping a memory-mapped one's pages; True if removed."""
    if value.is_initializer() and not value.uses() and not value.is_graph_output() and not value.is_graph_input():
        graph.initializers.pop(value.name or "")
        release_mapping(value.const_value)  # another model sharing the tensor maps it again if it reads it
        return True
    return False


def release_mapping(tensor: ir.TensorProtocol | None) -> None:
    """Drop an external tensor's resident pages and unmap its file unless a numpy view of it is still alive.

    A tensor of a file-backed array (scratch.file_backed_array) has its resident pages dropped. Other tensors are left
    alone. The mapping is read-only, so a view that is still alive reads the same bytes
    again from the file (the page cache) if it is used.
    """
    if isinstance(tensor, ir.ExternalTensor):
        if tensor.raw is not None and not tensor.raw.closed:
            tensor.raw.madvise(mmap.MADV_DONTNEED)
        with contextlib.suppress(BufferError):
            tensor.release()
    elif isinstance(tensor, ir.Tensor) and isinstance(tensor.raw, np.ndarray):
        drop_pages(tensor.raw)


def release_pages(tensor: ir.TensorProtocol | None, start: int, stop: int) -> None:
    """Drop the resident pages of bytes [start, stop) of an external tensor's data that it has mapped.

    Other tensors are left alone. Only whole pages inside the range go (a view reads them again from the file).
    """
    if isinstance(tensor, ir.ExternalTensor) and tensor.raw is not None and not tensor.raw.closed:
        base = tensor.offset or 0
        first = -(-(base + start) // mmap.PAGESIZE) * mmap.PAGESIZE
        last = (base + stop) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            tensor.raw.madvise(mmap.MADV_DONTNEED, first, last - first)


def read_in_slices(tensor: ir.TensorProtocol, array: np.ndarray) -> Iterator[slice]:
    """Leading-axis slices of ``array`` (the tensor's values, at least 1-D), about SLICE_ELEMENTS values each.

    Once the caller has read a slice, a memory-mapped tensor's pages of it are dropped: a copy made slice by slice
    never has the whole original resident beside it.
    """
    row = array.size // max(1, array.shape[0])  # values per leading-axis index
    step = max(1, SLICE_ELEMENTS // max(1, row))
    for start in range(0, array.shape[0], step):
        yield slice(start, start + step)
        release_pages(tensor, start * row * array.itemsize, (start + step) * row * array.itemsize)
