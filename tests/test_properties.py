"""Property tests: hypothesis builds small random graphs of MatMul/Gemm/LayerNormalization/Add/Relu/Conv.

Every exact pass must keep onnxruntime's outputs (within fp32 rounding, see ``assert_close``); every preset recipe
on every lowering target must give a graph that passes onnx's checker and runs with finite outputs. The number of
examples comes from the hypothesis profile in conftest.py (GRAPHQUANT_HYPOTHESIS=deep for long runs).
"""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper
import onnx_ir as ir
import pytest
from builders import run
from hypothesis import given
from hypothesis import strategies as st

import graphquant
from graphquant.analysis.calibration import Calibrator
from graphquant.lowering import TARGETS
from graphquant.passes import PASSES
from graphquant.passes.preexecute_dequant import METHODS
from graphquant.recipes import preset_names

# Blocks on a [N, C] activation; "fork" is two MatMuls reading one tensor (a scale group), "residual" is x + x·W.
FLAT_BLOCKS = ("matmul", "matmul_bias", "gemm", "layer_norm", "relu", "add_const", "fork", "residual")
ROWS = 12


@dataclasses.dataclass(frozen=True)
class GraphSpec:
    """A random graph's structure: optional Conv stem, then flat blocks, plus the weight and data seeds."""

    convs: tuple[int, ...]
    blocks: tuple[tuple[str, int], ...]
    channels: int
    seed: int
    outlier_channels: tuple[int, ...]


@st.composite
def graph_specs(draw: st.DrawFn) -> GraphSpec:
    """Random structures of 1-6 blocks over widths 2-12, some with a Conv stem and outlier channels."""
    channels = draw(st.integers(2, 8))
    convs = tuple(draw(st.lists(st.integers(1, 6), max_size=2)))
    blocks = tuple(
        (draw(st.sampled_from(FLAT_BLOCKS)), draw(st.integers(2, 12))) for _ in range(draw(st.integers(1, 6)))
    )
    width = convs[-1] * 4 if convs else channels
    outliers = tuple(sorted(draw(st.sets(st.integers(0, width - 1), max_size=2))))
    return GraphSpec(convs, blocks, channels, draw(st.integers(0, 2**16)), outliers)


class GraphBuilder:
    """Accumulates nodes and initializers of one random graph."""

    def __init__(self, rng: np.random.Generator, outlier_channels: tuple[int, ...]):
        self.rng = rng
        self.outliers = outlier_channels
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def constant(self, array: np.ndarray) -> str:
        """A new initializer."""
        name = f"c{len(self.initializers)}"
        self.initializers.append(onnx.numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def weight(self, *shape: int) -> str:
        """Gaussian weights; a few entries 20x larger, as trained layers have."""
        array = self.rng.standard_normal(shape) / np.sqrt(shape[0])
        array.flat[self.rng.integers(0, array.size, max(1, array.size // 50))] *= 20.0
        return self.constant(array)

    def node(self, op: str, inputs: list[str], **attributes: object) -> str:
        """Append a node and return its output name."""
        output = f"t{len(self.nodes)}"
        self.nodes.append(oh.make_node(op, inputs, [output], name=f"{op.lower()}_{len(self.nodes)}", **attributes))
        return output

    def block(self, kind: str, x: str, width: int, out: int) -> tuple[str, int]:
        """One flat block on a [N, width] tensor; returns its output and width."""
        if kind == "matmul":
            return self.node("MatMul", [x, self.weight(width, out)]), out
        if kind == "matmul_bias":
            y = self.node("MatMul", [x, self.weight(width, out)])
            return self.node("Add", [y, self.constant(self.rng.standard_normal(out))]), out
        if kind == "gemm":
            return self.node(
                "Gemm", [x, self.weight(out, width), self.constant(self.rng.standard_normal(out))], transB=1
            ), out
        if kind == "layer_norm":
            gamma = 1.0 + 0.1 * self.rng.standard_normal(width)
            beta = 0.1 * self.rng.standard_normal(width)
            for channel in (c for c in self.outliers if c < width):
                gamma[channel], beta[channel] = 25.0, 40.0
            return self.node("LayerNormalization", [x, self.constant(gamma), self.constant(beta)], axis=-1), width
        if kind == "relu":
            return self.node("Relu", [x]), width
        if kind == "add_const":
            return self.node("Add", [x, self.constant(self.rng.standard_normal(width))]), width
        if kind == "fork":
            left = self.node("MatMul", [x, self.weight(width, out)])
            return self.node("Add", [left, self.node("MatMul", [x, self.weight(width, out)])]), out
        y = self.node("MatMul", [x, self.weight(width, width)])
        return self.node("Add", [x, y]), width


def build_model(spec: GraphSpec) -> tuple[ir.Model, tuple[int, ...]]:
    """The spec's model and its input shape (batch dim symbolic)."""
    rng = np.random.default_rng(spec.seed)
    builder = GraphBuilder(rng, spec.outlier_channels)
    x, channels = "x", spec.channels
    input_shape: tuple[int, ...] = (channels, 2, 2) if spec.convs else (channels,)
    for out in spec.convs:
        weight = builder.constant(rng.standard_normal((out, channels, 1, 1)) / np.sqrt(channels))
        x = builder.node("Relu", [builder.node("Conv", [x, weight, builder.constant(rng.standard_normal(out))])])
        channels = out
    if spec.convs:
        x, channels = builder.node("Flatten", [x], axis=1), channels * 4
    for kind, out in spec.blocks:
        x, channels = builder.block(kind, x, channels, out)
    graph = oh.make_graph(
        builder.nodes,
        "random",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", *input_shape])],
        [oh.make_tensor_value_info(x, onnx.TensorProto.FLOAT, ["N", channels])],
        builder.initializers,
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto), input_shape


def feeds(spec: GraphSpec, input_shape: tuple[int, ...], seed: int, batches: int = 3) -> list[dict[str, np.ndarray]]:
    """Gaussian inputs whose outlier channels (flat inputs only) are 30x wider and centred on +20."""
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(batches):
        x = rng.standard_normal((ROWS, *input_shape)).astype(np.float32)
        if len(input_shape) == 1:
            for channel in (c for c in spec.outlier_channels if c < input_shape[0]):
                x[:, channel] = x[:, channel] * 30.0 + 20.0
        data.append({"x": x})
    return data


def assert_close(expected: np.ndarray, got: np.ndarray) -> None:
    """fp32 equality up to reassociation: rtol 1e-3 and atol 1e-4 of the output's largest magnitude."""
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * scale)


def exact_passes() -> list[tuple[str, dict[str, object]]]:
    """Every pass whose docstring declares it exact, once per method for preexecute-dequant."""
    cases: list[tuple[str, dict[str, object]]] = []
    for name, pass_class in sorted(PASSES.items()):
        if not (pass_class.__doc__ or "").startswith("Exact"):
            continue
        if name == "preexecute-dequant":
            cases.extend((name, {"method": method}) for method in METHODS)
            cases.append((name, {"row_scales_below_db": float("inf")}))  # every group on per-token scales
        else:
            cases.append((name, {}))
    return cases


def make_pass(name: str, options: dict[str, object], calibrator: Calibrator) -> ir.passes.PassBase:
    """The pass with the calibrator if its constructor takes one."""
    pass_class = PASSES[name]
    if "calibrator" in inspect.signature(pass_class).parameters:
        return pass_class(calibrator, **options)
    return pass_class(**options)


def test_the_exact_passes_are_found():
    names = {name for name, _ in exact_passes()}
    assert {"symmetrize", "preexecute-dequant", "outlier-decompose"} <= names
    assert "quantize" not in names


@pytest.mark.parametrize(("name", "options"), exact_passes(), ids=lambda v: v if isinstance(v, str) else "")
@given(spec=graph_specs())
def test_exact_passes_keep_the_outputs(name, options, spec):
    model, input_shape = build_model(spec)
    reference = model.clone()
    calibration, held_out = feeds(spec, input_shape, 1), feeds(spec, input_shape, 2)
    calibrator = Calibrator.for_model(model, calibration, show_progress=False)
    make_pass(name, options, calibrator)(model)
    onnx.checker.check_model(ir.to_proto(model))
    for feed in calibration[:1] + held_out:
        (expected,) = run(reference, feed)
        (got,) = run(model, feed)
        assert_close(expected, got)


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("recipe", preset_names())
@given(spec=graph_specs())
def test_lossy_pipelines_give_checked_runnable_graphs(recipe, target, spec):
    model, input_shape = build_model(spec)
    calibration, held_out = feeds(spec, input_shape, 1), feeds(spec, input_shape, 2)
    # The property is a checked, runnable, finite graph; the fidelity threshold is for real models, not random ones.
    result = graphquant.optimize(model, recipe, calibration, target=target, show_progress=False, keep_failed=True)
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)
    for feed in held_out:
        (y,) = run(result.model, feed)
        assert y.shape == run(model, feed)[0].shape
        assert np.isfinite(y).all()
