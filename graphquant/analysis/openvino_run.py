"""Run a model on OpenVINO's CPU plugin: named outputs for validation, and the precision each layer runs in."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import onnx_ir as ir

from graphquant.analysis.data import Feed
from graphquant.errors import ExecutorError, InvalidModelError
from graphquant.scratch import scratch_folder

# The executors validation can run on; onnxruntime is the default.
EXECUTORS = ("onnxruntime", "openvino")
# OpenVINO's CPU default runs float layers in bf16 where the CPU has it; a reference must run in float32.
FLOAT32 = {"INFERENCE_PRECISION_HINT": "f32"}
# Keeps each MatMul its own layer (no fused attention subgraph), so that its precision can be read per op.
UNFUSED = {"SNIPPETS_MODE": "DISABLE"}
MODEL_FILE = "model.onnx"


@dataclasses.dataclass(frozen=True)
class RuntimeLayer:
    """One node of OpenVINO's execution graph: its kind, the precision it computes in, the ONNX nodes it covers."""

    name: str
    layer_type: str
    precision: str
    original_names: tuple[str, ...]


def check_executor(executor: str) -> None:
    """Refuse an unknown executor, and openvino when it is not installed."""
    if executor not in EXECUTORS:
        raise ExecutorError(f"unknown executor {executor!r} (known: {', '.join(EXECUTORS)})")
    if executor == "openvino":
        openvino_module()


def openvino_module() -> ModuleType:
    """The openvino package, or an ExecutorError saying how to install it."""
    try:
        import openvino
    except ImportError as exc:
        raise ExecutorError(
            "the openvino executor needs the openvino package: pip install 'graphquant[openvino]'"
        ) from exc
    return openvino


@contextlib.contextmanager
def compiled_model(
    model: ir.Model, extra_outputs: Sequence[str] = (), config: dict[str, str] | None = None
) -> Iterator[Any]:
    """The model compiled for OpenVINO's CPU plugin, with extra named tensors added to its outputs.

    The model is written to a temporary folder (weights as external data beside it) for OpenVINO's ONNX reader.
    """
    ov = openvino_module()
    with scratch_folder() as folder:
        path = folder / MODEL_FILE
        ir.save(model, path, external_data=f"{MODEL_FILE}.data")
        core = ov.Core()
        try:
            network = core.read_model(str(path))
            known = {name for output in network.outputs for name in output.get_names()}
            missing = [name for name in dict.fromkeys(extra_outputs) if name not in known]
            if missing:
                network.add_outputs(missing)
            compiled = core.compile_model(network, "CPU", dict(config or {}))
        except RuntimeError as exc:  # OpenVINO raises RuntimeError (or its subclasses) for every load failure
            raise InvalidModelError(f"OpenVINO cannot load the model: {_first_line(exc)}") from exc
        yield compiled


def run(compiled: Any, names: Sequence[str], feed: Feed) -> dict[str, np.ndarray]:
    """The named outputs for one feed; a run-time failure is an InvalidModelError naming "the model"."""
    try:
        results = compiled(dict(feed))
    except RuntimeError as exc:
        raise InvalidModelError(f"OpenVINO cannot run the model: {_first_line(exc)}") from exc
    return {name: np.asarray(results[compiled.output(name)]) for name in names}


def runtime_layers(compiled: Any) -> list[RuntimeLayer]:
    """The execution graph OpenVINO compiled: each node's layer type and run-time precision (e.g. i8, u8, f32)."""
    layers = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        originals = str(info["originalLayersNames"].astype(str))
        layers.append(
            RuntimeLayer(
                op.get_friendly_name(),
                str(info["layerType"].astype(str)),
                str(info["runtimePrecision"].astype(str)),
                tuple(name for name in originals.split(",") if name),
            )
        )
    return layers


def layer_precisions(model: ir.Model, config: dict[str, str] | None = None) -> collections.Counter[tuple[str, str]]:
    """How many layers of each (type, run-time precision) OpenVINO's CPU plugin compiles the model into."""
    with compiled_model(model, config=config) as compiled:
        return collections.Counter((layer.layer_type, layer.precision) for layer in runtime_layers(compiled))


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name if it has none)."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
