"""Read ONNX files into onnx_ir, refusing unsafe external-data references."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from graphquant.errors import InvalidModelError
from graphquant.frontends.mapped_weights import mark_inline, read_model_proto


def load(path: str | os.PathLike[str]) -> ir.Model:
    """Load an ONNX model as an onnx_ir model, with external data memory-mapped."""
    model_path = Path(path)
    if not model_path.is_file():
        raise InvalidModelError(f"{model_path}: no such file")
    if model_path.stat().st_size == 0:
        raise InvalidModelError(f"{model_path}: file is empty")
    try:
        proto = read_model_proto(model_path)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise InvalidModelError(f"{model_path}: not a valid ONNX model ({type(exc).__name__})") from exc
    if not proto.graph.node and not proto.graph.output:
        raise InvalidModelError(f"{model_path}: not a valid ONNX model (no graph)")
    check_external_data_locations(proto, model_path.parent)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx_ir raises many types on malformed protos
        raise InvalidModelError(f"{model_path}: cannot be read as ONNX ({exc})") from exc
    ir.external_data.set_base_dir(model.graph, str(model_path.parent))
    mark_inline(model, model_path)
    return model


def check_external_data_locations(proto: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse external-data paths that escape the model directory or do not exist."""
    root = base_dir.resolve()
    for tensor in _all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        target = (root / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(root):
            raise InvalidModelError(
                f"tensor {tensor.name!r}: external data location {location!r} is outside the model directory"
            )
        if not target.is_file():
            raise InvalidModelError(f"tensor {tensor.name!r}: external data file {location!r} is missing")
        if target.stat().st_nlink > 1:  # a hard link can bring any file of the same file system inside the folder
            raise InvalidModelError(f"tensor {tensor.name!r}: external data file {location!r} has several hard links")
        end = int(entries.get("offset", 0)) + int(entries.get("length", 0))
        if end > target.stat().st_size:
            raise InvalidModelError(
                f"tensor {tensor.name!r}: external data file {location!r} is shorter than the tensor ({end} bytes)"
            )


def _all_tensors(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every initializer and constant tensor in the model, subgraphs included."""
    tensors: list[onnx.TensorProto] = []
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        tensors.extend(graph.initializer)
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    tensors.append(attr.t)
                tensors.extend(attr.tensors)
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    return tensors
