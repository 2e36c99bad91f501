"""Read a large ONNX file with its inline weights left in the file: they become external references to it.

Parsing a protobuf copies every byte of it, and numpy then copies each tensor again; a 575 MB model peaked at twice
its size before any work. Here only the graph structure is parsed: the protobuf wire format is walked down to the
main graph's initializers, whose ``raw_data`` fields are replaced by (offset, length) references into the model file
itself, so onnx_ir memory-maps them like any external data.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

# Files from this size on are read this way (smaller ones are parsed whole, as onnx.load does).
MAPPED_FILE_BYTES = 256 << 20
# Only weights from this size on are mapped; smaller raw_data stays in the parsed proto.
MAPPED_TENSOR_BYTES = 4096
# On a mapped tensor: its data is the model file's own inline bytes, not an external data file.
INLINE_KEY = "graphquant.inline_data"

# Protobuf field numbers (onnx.proto3) and wire types.
MODEL_GRAPH, GRAPH_INITIALIZER, TENSOR_RAW_DATA = 7, 5, 9
TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 13, 14
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


def read_model_proto(path: Path) -> tuple[onnx.ModelProto, frozenset[tuple[int, int]]]:
    """The file's ModelProto, large files with their inline weights as references into the file itself.

    Also the (offset, length) spans of the file that those references name, so that the load's safety check can tell
    them from external-data entries of the file's own that point back at it.
    """
    status = path.stat()
    # A file with several hard links is refused as an external data file, so it is not made one of its own.
    if status.st_size < MAPPED_FILE_BYTES or status.st_nlink > 1:
        return onnx.load(str(path), load_external_data=False), frozenset()
    spans: set[tuple[int, int]] = set()
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        view = memoryview(data)
        try:
            return onnx.ModelProto.FromString(b"".join(_model(view, path.name, spans))), frozenset(spans)
        finally:
            view.release()


def mark_inline(model: ir.Model, path: Path) -> None:
    """Mark the external tensors that point at the model file itself (its inline weights, mapped)."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and Path(tensor.location) == Path(path.name):
            tensor.meta[INLINE_KEY] = True


def _model(data: memoryview, location: str, spans: set[tuple[int, int]]) -> Iterator[bytes]:
    """ModelProto bytes with the graph's initializers rewritten; the spans they reference are added to ``spans``."""
    for field, wire, head, start, end in _fields(data, 0, len(data)):
        if field == MODEL_GRAPH and wire == LENGTH:
            yield _length_field(field, b"".join(_graph(data, start, end, location, spans)))
        else:
            yield bytes(data[head:end])


def _graph(data: memoryview, begin: int, stop: int, location: str, spans: set[tuple[int, int]]) -> Iterator[bytes]:
    """GraphProto bytes with each initializer's large raw_data turned into an external reference."""
    for field, wire, head, start, end in _fields(data, begin, stop):
        if field == GRAPH_INITIALIZER and wire == LENGTH:
            yield _length_field(field, _tensor(data, start, end, location, spans))
        else:
            yield bytes(data[head:end])


def _tensor(data: memoryview, begin: int, stop: int, location: str, spans: set[tuple[int, int]]) -> bytes:
    """TensorProto bytes: raw_data of MAPPED_TENSOR_BYTES or more becomes (location, offset, length).

    A tensor that already names external data is left as it is, for the load's check to judge.
    """
    fields = list(_fields(data, begin, stop))
    raw = [f for f in fields if f[0] == TENSOR_RAW_DATA and f[1] == LENGTH and f[4] - f[3] >= MAPPED_TENSOR_BYTES]
    if not raw or any(f[0] in (TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION) for f in fields):
        return bytes(data[begin:stop])
    *_, start, end = raw[-1]  # protobuf keeps the last of a repeated singular field
    kept = [bytes(data[head:field_end]) for field, _, head, _, field_end in fields if field != TENSOR_RAW_DATA]
    spans.add((start, end - start))
    entries = {"location": location, "offset": str(start), "length": str(end - start)}
    for key, value in entries.items():
        entry = onnx.StringStringEntryProto(key=key, value=value).SerializeToString()
        kept.append(_length_field(TENSOR_EXTERNAL_DATA, entry))
    kept.append(_varint((TENSOR_DATA_LOCATION << 3) | VARINT) + _varint(onnx.TensorProto.EXTERNAL))
    return b"".join(kept)


def _fields(data: memoryview, begin: int, stop: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, payload start, end) of each field of the message in data[begin:stop]."""
    position = begin
    while position < stop:
        head = position
        key, position = _read_varint(data, position)
        field, wire = key >> 3, key & 7
        if wire == VARINT:
            _, end = _read_varint(data, position)
        elif wire == LENGTH:
            length, position = _read_varint(data, position)
            end = position + length
        elif wire in (FIXED64, FIXED32):
            end = position + (8 if wire == FIXED64 else 4)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if end > stop:
            raise ValueError("truncated protobuf field")
        yield field, wire, head, position, end
        position = end


def _read_varint(data: memoryview, position: int) -> tuple[int, int]:
    """A base-128 varint at ``position`` and the position after it."""
    value = shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise ValueError("truncated protobuf varint")
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        shift += 7
        if not byte & 0x80:
            return value, position


def _varint(value: int) -> bytes:
    """A base-128 varint."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _length_field(field: int, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    return _varint((field << 3) | LENGTH) + _varint(len(payload)) + payload
