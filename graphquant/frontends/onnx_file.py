"""Read ONNX files into onnx_ir, refusing unsafe external-data references and malformed graphs before any use."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import networkx as nx
import onnx
import onnx.helper
import onnx_ir as ir
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from graphquant.errors import InvalidModelError
from graphquant.frontends.mapped_weights import mark_inline, read_model_proto
from graphquant.logs import silenced

DEFAULT_DOMAINS = ("", "ai.onnx")
OLDEST_IR_VERSION = 3  # the first with opset imports; onnx's checker refuses older models that have them
SUB_BYTE_FIELD = "int32_data"  # 2- and 4-bit tensors pack one byte of values into each int32_data entry


def load(path: str | os.PathLike[str]) -> ir.Model:
    """Load an ONNX model as an onnx_ir model, with external data memory-mapped."""
    model_path = Path(path)
    if not model_path.is_file():
        raise InvalidModelError(f"{model_path}: no such file")
    if model_path.stat().st_size == 0:
        raise InvalidModelError(f"{model_path}: file is empty")
    try:
        proto, inline_spans = read_model_proto(model_path)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise InvalidModelError(f"{model_path}: not a valid ONNX model ({type(exc).__name__})") from exc
    if not proto.graph.node and not proto.graph.output:
        raise InvalidModelError(f"{model_path}: not a valid ONNX model (no graph)")
    try:
        check_model_proto(proto, model_path, inline_spans)
    except InvalidModelError as exc:
        raise InvalidModelError(f"{model_path}: {exc}") from None
    try:
        with silenced("onnx_ir"):  # its repair warnings would print on stderr
            model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx_ir raises many types on malformed protos
        raise InvalidModelError(f"{model_path}: cannot be read as ONNX ({exc})") from exc
    ir.external_data.set_base_dir(model.graph, str(model_path.parent))
    mark_inline(model, model_path)
    return model


def check_model_proto(
    proto: onnx.ModelProto, model_path: Path, inline_spans: frozenset[tuple[int, int]] = frozenset()
) -> None:
    """Refuse what graphquant cannot read safely: bad opsets, sparse or malformed tensors, broken graphs.

    ``inline_spans`` are the (offset, length) spans of the model file that the load itself turned into references to
    the file (its mapped inline weights); any other reference to the model file is refused.
    """
    check_text(proto)
    if not OLDEST_IR_VERSION <= proto.ir_version <= onnx.IR_VERSION:
        raise InvalidModelError(
            f"IR version {proto.ir_version} is not one onnx reads ({OLDEST_IR_VERSION} to {onnx.IR_VERSION})"
        )
    _check_opsets(proto)
    for tensor in _all_tensors(proto):
        check_tensor(tensor, model_path.parent, model_path, inline_spans=inline_spans)
    _check_graph(proto.graph, set(), "the main graph")
    for function in proto.functions:
        _check_graph(function, set(), f"function {function.domain}.{function.name}")


def check_text(message: Message) -> None:
    """Refuse string fields that are not UTF-8 text (protobuf hands them over as bytes), nested messages included."""
    pending = [message]
    while pending:
        current = pending.pop()
        for field in current.DESCRIPTOR.fields:  # not ListFields: that would copy every tensor's raw bytes
            if field.type not in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_STRING):
                continue
            value = getattr(current, field.name)
            if isinstance(value, (str, bytes, Message)):  # a singular field
                if isinstance(value, Message) and not current.HasField(field.name):
                    continue
                value = [value]
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                pending.extend(value)
            elif not all(isinstance(text, str) for text in value):
                raise InvalidModelError(f"the {current.DESCRIPTOR.name} field {field.name!r} is not UTF-8 text")


def check_tensor(
    tensor: onnx.TensorProto,
    base_dir: Path,
    own_file: Path | None = None,
    folder: str = "the model directory",
    inline_spans: frozenset[tuple[int, int]] = frozenset(),
) -> None:
    """Refuse a tensor whose dims do not match its data, or whose external data is unsafe or short.

    External data must be a single-link regular file inside ``base_dir`` (called ``folder`` in errors), other than
    ``own_file`` (the file holding the tensor).
    """
    label = f"tensor {tensor.name!r}" if tensor.name else "the tensor"
    if tensor.HasField("segment"):
        raise InvalidModelError(f"{label} is segmented: not a plain tensor (a sequence or map?)")
    if tensor.data_type == onnx.TensorProto.UNDEFINED or tensor.data_type not in onnx.TensorProto.DataType.values():
        raise InvalidModelError(f"{label} has an unknown element type {tensor.data_type}")
    if any(dim < 0 for dim in tensor.dims):
        raise InvalidModelError(f"{label} has a negative dim in {tuple(tensor.dims)}")
    count = math.prod(tensor.dims)
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        _check_external(tensor, label, _stored_bytes(tensor, count), (base_dir, folder), own_file, inline_spans)
        return
    held, needed, unit = _held_and_needed(tensor, count)
    if held != needed:
        raise InvalidModelError(f"{label}: dims {tuple(tensor.dims)} need {needed} {unit}, the data holds {held}")


def _stored_bytes(tensor: onnx.TensorProto, count: int) -> int:
    """The bytes that ``count`` values of the tensor's type take in raw (or external) form."""
    if tensor.data_type == onnx.TensorProto.STRING:
        raise InvalidModelError(f"tensor {tensor.name!r}: string tensors cannot be stored as raw or external data")
    return math.ceil(count * ir.DataType(tensor.data_type).bitwidth / 8)


def _held_and_needed(tensor: onnx.TensorProto, count: int) -> tuple[int, int, str]:
    """How many bytes or entries the tensor stores, how many its dims need, and which unit that is."""
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data), _stored_bytes(tensor, count), "bytes"
    field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
    bits = 8 if tensor.data_type == onnx.TensorProto.STRING else ir.DataType(tensor.data_type).bitwidth
    if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
        needed = 2 * count  # real and imaginary parts are separate entries
    elif field == SUB_BYTE_FIELD and bits < 8:
        needed = math.ceil(count * bits / 8)
    else:
        needed = count
    return len(getattr(tensor, field)), needed, "values"


def _check_external(
    tensor: onnx.TensorProto,
    label: str,
    size: int,
    scope: tuple[Path, str],
    own_file: Path | None,
    inline_spans: frozenset[tuple[int, int]],
) -> None:
    """Refuse external data outside the scope folder, in ``own_file``, not a single-link file, or too short."""
    entries = {entry.key: entry.value for entry in tensor.external_data}
    location = entries.get("location", "")
    if not location or "\0" in location:
        raise InvalidModelError(f"{label}: external data location {location!r} is not a file name")
    for key in ("offset", "length"):
        if not entries.get(key, "0").isascii() or not entries.get(key, "0").isdigit():
            raise InvalidModelError(f"{label}: external data {key} {entries[key]!r} is not a non-negative integer")
    base_dir, folder = scope
    root = base_dir.resolve()
    target = (root / location).resolve()
    if Path(location).is_absolute() or not target.is_relative_to(root):
        raise InvalidModelError(f"{label}: external data location {location!r} is outside {folder}")
    if not target.is_file():
        raise InvalidModelError(f"{label}: external data file {location!r} is missing or not a regular file")
    span = (int(entries.get("offset", "0")), int(entries.get("length", size)))
    if own_file is not None and target.samefile(own_file) and span not in inline_spans:
        raise InvalidModelError(f"{label}: external data location {location!r} is the file that holds the tensor")
    if target.stat().st_nlink > 1:  # a hard link can bring any file of the same file system inside the folder
        raise InvalidModelError(f"{label}: external data file {location!r} has several hard links")
    length = int(entries.get("length", size))
    if length != size:
        raise InvalidModelError(f"{label}: external data length {length} does not match its dims ({size} bytes)")
    end = int(entries.get("offset", 0)) + length
    if end > target.stat().st_size:
        raise InvalidModelError(f"{label}: external data file {location!r} is shorter than the tensor ({end} bytes)")


def _check_opsets(proto: onnx.ModelProto) -> None:
    """Refuse a missing default-domain opset where default-domain ops are used, and opsets onnx does not know."""
    versions = {entry.domain: entry.version for entry in proto.opset_import}
    default = next((versions[domain] for domain in DEFAULT_DOMAINS if domain in versions), None)
    newest = onnx.defs.onnx_opset_version()
    if default is None:
        if any(node.domain in DEFAULT_DOMAINS for node in _all_nodes(proto)):
            raise InvalidModelError("the model imports no default-domain (ai.onnx) opset")
    elif not 1 <= default <= newest:
        raise InvalidModelError(f"default-domain opset {default} is not one onnx knows (1 to {newest})")
    else:
        _check_default_ops(proto.graph.node, default)
    for function in proto.functions:
        imported = {entry.domain: entry.version for entry in function.opset_import}
        version = next((imported[domain] for domain in DEFAULT_DOMAINS if domain in imported), default)
        if version is not None and 1 <= version <= newest:
            _check_default_ops(function.node, version)


def _check_default_ops(nodes: Iterable[onnx.NodeProto], opset: int) -> None:
    """Refuse default-domain nodes (subgraphs included) whose op the opset does not define."""
    for node in nodes:
        if node.domain in DEFAULT_DOMAINS and not onnx.defs.has(node.op_type, opset, ""):
            raise InvalidModelError(f"{_label(node)}: opset {opset} of the default domain has no op {node.op_type!r}")
        for subgraph in _subgraphs(node):
            _check_default_ops(subgraph.node, opset)


def _check_graph(graph: onnx.GraphProto | onnx.FunctionProto, outer: set[str], where: str) -> None:
    """Refuse reads of undefined values, outputs nothing defines, values defined twice, and cycles."""
    if isinstance(graph, onnx.GraphProto):
        inputs, outputs = [value.name for value in graph.input], [value.name for value in graph.output]
        initializers = [tensor.name for tensor in graph.initializer]
    else:
        inputs, outputs, initializers = list(graph.input), list(graph.output), []
    given = inputs + initializers  # a name may be both (an input with a default), but only once in each
    produced = [name for node in graph.node for name in node.output if name]
    repeated = _first_repeat(inputs) or _first_repeat(initializers) or _first_repeat(produced)
    repeated = repeated or next((name for name in produced if name in given), None)
    if repeated is not None:
        raise InvalidModelError(f"{where}: value {repeated!r} is defined more than once")
    defined = outer | set(given) | set(produced)
    for node in graph.node:
        missing = next((name for name in node.input if name and name not in defined), None)
        if missing is not None:
            raise InvalidModelError(f"{where}: {_label(node)} reads {missing!r}, which is undefined")
    missing = next((name for name in outputs if name not in defined), None)
    if missing is not None:
        raise InvalidModelError(f"{where}: output {missing!r} is produced by no node")
    _check_acyclic(graph.node, where)
    for node in graph.node:
        for subgraph in _subgraphs(node):
            _check_graph(subgraph, defined, f"a subgraph of {_label(node)}")


def _check_acyclic(nodes: list[onnx.NodeProto], where: str) -> None:
    """Refuse a graph whose nodes read, directly or through their subgraphs, what they help to produce."""
    producer = {name: index for index, node in enumerate(nodes) for name in node.output if name}
    dependencies = nx.DiGraph()
    dependencies.add_nodes_from(range(len(nodes)))
    for index, node in enumerate(nodes):
        for name in (*node.input, *_names_read_inside(node)):
            if name in producer:
                dependencies.add_edge(producer[name], index)
    with contextlib.suppress(nx.NetworkXNoCycle):
        cycle = nx.find_cycle(dependencies)
        raise InvalidModelError(f"{where}: the graph has a cycle through {_label(nodes[cycle[0][0]])}")


def _names_read_inside(node: onnx.NodeProto) -> Iterator[str]:
    """The value names that nodes inside the node's subgraphs read (outer-scope reads among them)."""
    for subgraph in _subgraphs(node):
        for inner in subgraph.node:
            yield from inner.input
            yield from _names_read_inside(inner)


def _label(node: onnx.NodeProto) -> str:
    """How an error names a node: its name and op type, or its op type alone."""
    return f"node {node.name!r} ({node.op_type})" if node.name else f"an unnamed {node.op_type} node"


def _first_repeat(names: list[str]) -> str | None:
    """The first name that occurs twice, if any."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held by a node's attributes."""
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def _all_nodes(proto: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """Every node of the main graph, its subgraphs and the model-local functions."""
    pending: list[onnx.NodeProto] = [*proto.graph.node, *(node for f in proto.functions for node in f.node)]
    while pending:
        node = pending.pop()
        yield node
        for subgraph in _subgraphs(node):
            pending.extend(subgraph.node)


def _all_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor graphquant may read: initializers and attribute tensors, in subgraphs and functions too."""
    graphs = [proto.graph]
    for node in _all_nodes(proto):
        graphs.extend(_subgraphs(node))
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor") or attr.sparse_tensors:
                raise InvalidModelError(f"{_label(node)}: sparse tensors are not supported")
    for graph in graphs:
        if graph.sparse_initializer:
            name = graph.sparse_initializer[0].values.name
            raise InvalidModelError(f"sparse initializer {name!r} is not supported (store it dense)")
        yield from graph.initializer
