"""Run an onnx_ir model in onnxruntime with chosen intermediate tensors exposed as outputs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from graphquant.errors import InvalidModelError
from graphquant.scratch import scratch_folder

# Above this many initializer bytes the model is written with external data (the protobuf limit is 2 GiB).
PROTO_SIZE_LIMIT = 1 << 30
# In large models, initializers from this size on reach onnxruntime as shared buffers (zero copy), not as bytes.
SHARED_INITIALIZER_BYTES = 1024
# The placeholder file the shared initializers point at; onnxruntime takes their data from the session options.
SHARED_LOCATION = "shared-initializers.bin"
SHAREABLE_DTYPES = frozenset(
    {
        ir.DataType.FLOAT,
        ir.DataType.FLOAT16,
        ir.DataType.DOUBLE,
        ir.DataType.INT8,
        ir.DataType.UINT8,
        ir.DataType.INT16,
        ir.DataType.UINT16,
        ir.DataType.INT32,
        ir.DataType.UINT32,
        ir.DataType.INT64,
        ir.DataType.UINT64,
        ir.DataType.BOOL,
    }
)


def initializer_bytes(model: ir.Model) -> int:
    """Total bytes held by the model's initializers."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def has_external_data(model: ir.Model) -> bool:
    """Whether any initializer still lives in an external data file (relative to the loaded model's folder)."""
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def session_options() -> ort.SessionOptions:
    """Quiet CPU options that keep one copy of the weights: no prepacked duplicates, external data memory-mapped."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: a failed run raises, and graphquant reports it in one line
    options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def load_session(source: str | os.PathLike[str] | bytes, options: ort.SessionOptions) -> ort.InferenceSession:
    """An onnxruntime CPU session, its load failure turned into an InvalidModelError."""
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped exceptions
        raise InvalidModelError(f"onnxruntime cannot load the model: {_first_line(exc)}") from exc


@contextlib.contextmanager
def open_session(model: ir.Model, extra_outputs: Sequence[str] = ()) -> Iterator[ort.InferenceSession]:
    """An onnxruntime CPU session on the model, with extra named tensors appended to its outputs.

    For models over PROTO_SIZE_LIMIT or with external data, the initializers reach onnxruntime as shared buffers
    (zero copy; memory-mapped ones stay mapped), so the session holds no second copy of the weights. The proto
    written for it names them as external data in a sparse placeholder file that onnxruntime never reads.
    """
    output_names = {value.name for value in model.graph.outputs}
    large = initializer_bytes(model) > PROTO_SIZE_LIMIT or has_external_data(model)
    shared = _shared_initializers(model) if large else {}
    release_mappings(model)
    proto = _session_proto(model, shared)
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in extra_outputs if n not in output_names)
    options = session_options()
    if shared:
        # onnxruntime's graph optimizers (constant folding, QDQ fusions) read initializer data from the proto, which
        # for shared initializers is the placeholder's zeros: the unoptimized graph runs instead.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    buffers = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(tensor.numpy())) for tensor in shared.values()]
    for name, buffer in zip(shared, buffers):
        options.add_initializer(name, buffer)
    try:
        with scratch_folder() as scratch:
            with open(scratch / SHARED_LOCATION, "wb") as placeholder:
                placeholder.truncate(max((tensor.nbytes for tensor in shared.values()), default=0))
            onnx.save(proto, scratch / "model.onnx")
            session = load_session(str(scratch / "model.onnx"), options)
        yield session
    finally:
        # The mappings can only close once nothing holds the buffers: callers drop the session first.
        session = options = buffers = None
        release_mappings(model)


def release_mappings(model: ir.Model) -> None:
    """Unmap the model's external tensors, dropping the pages read so far (they map again on the next read)."""
    for value in model.graph.initializers.values():
        release_mapping(value.const_value)


def release_mapping(tensor: ir.TensorProtocol | None) -> None:
    """Unmap an external tensor's file unless a numpy view of it is still alive; other tensors are left alone."""
    if isinstance(tensor, ir.ExternalTensor):
        with contextlib.suppress(BufferError):
            tensor.release()


def _shared_initializers(model: ir.Model) -> dict[str, ir.TensorProtocol]:
    """The main graph's large, used initializers whose dtype numpy and onnxruntime share as is."""
    # onnxruntime drops unused initializers before it takes the shared ones, and then cannot find them.
    return {
        name: value.const_value
        for name, value in model.graph.initializers.items()
        if value.const_value is not None
        and (value.uses() or value.is_graph_output())
        and value.const_value.nbytes >= SHARED_INITIALIZER_BYTES
        and value.const_value.dtype in SHAREABLE_DTYPES
    }


def _session_proto(model: ir.Model, shared: dict[str, ir.TensorProtocol]) -> onnx.ModelProto:
    """The model's proto: shared initializers as data-less external references, other external data inlined."""
    originals = {name: value.const_value for name, value in model.graph.initializers.items()}
    try:
        for name, tensor in originals.items():
            if name in shared:
                stand_in = ir.ExternalTensor(
                    SHARED_LOCATION, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=name
                )
                model.graph.initializers[name].const_value = stand_in
            elif isinstance(tensor, ir.ExternalTensor):  # a proto in memory has no folder to resolve it against
                model.graph.initializers[name].const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=name)
        return ir.to_proto(model)
    finally:
        for name, tensor in originals.items():
            model.graph.initializers[name].const_value = tensor


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
