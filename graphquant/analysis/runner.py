"""Run an onnx_ir model in onnxruntime with chosen intermediate tensors exposed as outputs."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime as ort

from graphquant.errors import InvalidModelError

# Above this many initializer bytes the model goes to onnxruntime as a file with external data.
PROTO_SIZE_LIMIT = 1 << 30


def initializer_bytes(model: ir.Model) -> int:
    """Total bytes held by the model's initializers."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def has_external_data(model: ir.Model) -> bool:
    """Whether any initializer still lives in an external data file (relative to the loaded model's folder)."""
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


@contextlib.contextmanager
def open_session(model: ir.Model, extra_outputs: Sequence[str] = ()) -> Iterator[ort.InferenceSession]:
    """An onnxruntime CPU session on the model, with extra named tensors appended to its outputs."""
    output_names = {value.name for value in model.graph.outputs}
    with tempfile.TemporaryDirectory(prefix="graphquant-") as scratch:
        proto = _proto_with_outputs(model, [n for n in extra_outputs if n not in output_names], Path(scratch))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            if isinstance(proto, Path):
                session = ort.InferenceSession(str(proto), options, providers=["CPUExecutionProvider"])
            else:
                session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise InvalidModelError(f"onnxruntime cannot load the model: {_first_line(exc)}") from exc
        yield session


def _proto_with_outputs(model: ir.Model, extra_outputs: Sequence[str], scratch: Path) -> onnx.ModelProto | Path:
    """The model as a proto (or a file for large models) with untyped extra outputs added."""
    # A proto in memory has no folder to resolve external data against: those models go as a file too.
    if initializer_bytes(model) <= PROTO_SIZE_LIMIT and not has_external_data(model):
        proto = ir.to_proto(model)
        proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in extra_outputs)
        return proto
    model_path = scratch / "model.onnx"
    ir.save(model, model_path, external_data="model.onnx.data")
    proto = onnx.load(str(model_path), load_external_data=False)
    proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in extra_outputs)
    onnx.save(proto, str(model_path))
    return model_path


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
