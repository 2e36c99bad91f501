"""Odd but valid graphs: old and new opsets, initializers listed as inputs, custom-domain ops, model-local functions,
If/Loop/Scan subgraphs and symbolic dims. Whatever graphquant cannot quantize it passes through untouched (and says
why), what it can it still quantizes, and the result matches the float model in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper
import onnx.parser
import onnx_ir as ir
import pytest
from builders import relu_only, run, save_model, weights
from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as NotImplementedByOnnxruntime

import graphquant
from graphquant.cli import main
from graphquant.errors import InvalidModelError, OutputError
from graphquant.recipes import PassStep, Recipe

WEIGHT_ONLY = Recipe("weight-only", (PassStep("quantize", {"abits": None}),))

FLOAT = onnx.TensorProto.FLOAT


def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def gaussian(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    ref, cand = reference.astype(np.float64).ravel(), candidate.astype(np.float64).ravel()
    return float(ref @ cand / (np.linalg.norm(ref) * np.linalg.norm(cand)))


def quantize_and_compare(
    model: ir.Model, data: list[dict[str, np.ndarray]], **options: object
) -> graphquant.OptimizeResult:
    """Optimize on ``data``; the result's outputs keep cosine > 0.98 with the float model's on held-out feeds."""
    result = graphquant.optimize(model, calibration=data, show_progress=False, **options)
    held_out = [
        {name: gaussian(array.shape, seed=100 + i) for name, array in feed.items()} for i, feed in enumerate(data)
    ]
    for feed in held_out:
        for expected, got in zip(run(model, feed), run(result.model, feed), strict=True):
            assert got.shape == expected.shape
            assert cosine(expected, got) > 0.98
    return result


def statuses(result: graphquant.OptimizeResult) -> dict[str, tuple[str, str]]:
    """Each reported layer's status and reason, by node name."""
    return {layer.node: (layer.status, layer.reason) for layer in result.report.layers}


# --- opsets ---


def mlp_proto(opset: int, ir_version: int, initializers_as_inputs: bool = False) -> onnx.ModelProto:
    """x -> MatMul -> Add -> Relu -> Gemm(transB) written against ``opset``, with named nodes."""
    generator = rng()
    tensors = {
        "w1": weights(generator, 16, 8),
        "b1": weights(generator, 8),
        "w2": weights(generator, 4, 8),
        "b2": weights(generator, 4),
    }
    nodes = [
        oh.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        oh.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
        oh.make_node("Relu", ["hb"], ["r"], name="act"),
        oh.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    inputs = [oh.make_tensor_value_info("x", FLOAT, ["N", 16])]
    if initializers_as_inputs or ir_version < 4:  # IR version 3 requires it
        inputs += [oh.make_tensor_value_info(name, FLOAT, list(array.shape)) for name, array in tensors.items()]
    graph = oh.make_graph(
        nodes,
        "mlp",
        inputs,
        [oh.make_tensor_value_info("y", FLOAT, ["N", 4])],
        [onnx.numpy_helper.from_array(array, name) for name, array in tensors.items()],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=ir_version)
    onnx.checker.check_model(proto)
    return proto


OPSET_IR = {7: 3, 9: 4, 11: 6, 13: 7, 17: 8, 21: 10}


def onnxruntime_dequantizes_at(opset: int) -> bool:
    """Whether this onnxruntime implements DequantizeLinear at ``opset`` (it trails onnx's newest opset)."""
    text = f"""
    <ir_version: {onnx.IR_VERSION}, opset_import: ["" : {opset}]>
    probe (int8[4] q) => (float[4] y) {{
      y = DequantizeLinear(q, scale)
    }}
    """
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.5, np.float32), "scale"))
    try:
        run(ir.serde.deserialize_model(proto), {"q": np.arange(4, dtype=np.int8)})
    except NotImplementedByOnnxruntime:
        return False
    return True


@pytest.mark.parametrize("opset", [*OPSET_IR, onnx.defs.onnx_opset_version()])
def test_every_opset_quantizes(opset):
    proto = mlp_proto(opset, OPSET_IR.get(opset, onnx.IR_VERSION))
    model = ir.serde.deserialize_model(proto)
    data = [{"x": gaussian((8, 16), seed)} for seed in range(3)]
    if not onnxruntime_dequantizes_at(max(opset, 13)):  # onnxruntime trails onnx: then one clear error
        with pytest.raises(InvalidModelError, match="onnxruntime cannot load the quantized model.*DequantizeLinear"):
            graphquant.optimize(model, calibration=data, show_progress=False)
        return
    result = quantize_and_compare(model, data)
    assert statuses(result) == {"fc1": ("quantized", ""), "fc2": ("quantized", "")}
    assert result.model.opset_imports[""] >= max(opset, 13)
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)


@pytest.mark.parametrize("opset", [7, 8])
def test_ir3_model_listing_initializers_as_inputs(tmp_path, capsys, opset):
    source = tmp_path / "old.onnx"
    source.write_bytes(mlp_proto(opset, 3, initializers_as_inputs=True).SerializeToString())
    before = source.read_bytes()
    np.savez(tmp_path / "calib.npz", x=gaussian((32, 16)))
    output = tmp_path / "q.onnx"
    code = main(
        ["optimize", "--recipe", "w8a8", str(source), "-o", str(output), "--calib", str(tmp_path / "calib.npz")]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "layers quantized: 2" in captured.out
    assert source.read_bytes() == before
    quantized = graphquant.load(output)
    assert [value.name for value in quantized.graph.inputs] == ["x"]
    x = gaussian((8, 16), 3)
    assert cosine(run(graphquant.load(source), {"x": x})[0], run(quantized, {"x": x})[0]) > 0.99


# --- custom domains ---


CONTRIB = """
<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
contrib (float[N, 16] x) => (float[N, 8] y) {
  [fc1] h = MatMul(x, w1)
  [gelu] g = com.microsoft.Gelu(h)
  [fc2] y = MatMul(g, w2)
}
"""


def test_contrib_op_passes_through_and_its_neighbours_quantize():
    generator = rng()
    proto = onnx.parser.parse_model(CONTRIB)
    proto.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(weights(generator, 16, 16), "w1"),
            onnx.numpy_helper.from_array(weights(generator, 16, 8), "w2"),
        ]
    )
    model = ir.serde.deserialize_model(proto)
    result = quantize_and_compare(model, [{"x": gaussian((8, 16), seed)} for seed in range(3)])
    assert statuses(result) == {"fc1": ("quantized", ""), "fc2": ("quantized", "")}
    (gelu,) = [node for node in result.model.graph if node.op_type == "Gelu"]
    assert gelu.domain == "com.microsoft" and gelu.name == "gelu"
    assert result.model.opset_imports["com.microsoft"] == 1


UNKNOWN = """
<ir_version: 8, opset_import: ["" : 17, "com.example.plugins" : 1]>
unknown (float[N, 16] x) => (float[N, 8] y) {
  [fc1] h = MatMul(x, w1)
  [plugin] g = com.example.plugins.FancyActivation<alpha: float = 0.5>(h)
  [fc2] y = MatMul(g, w2)
}
"""


def unknown_domain_file(folder: Path) -> Path:
    """A model with an op no runtime here knows, between two MatMuls."""
    generator = rng()
    proto = onnx.parser.parse_model(UNKNOWN)
    proto.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(weights(generator, 16, 16), "w1"),
            onnx.numpy_helper.from_array(weights(generator, 16, 8), "w2"),
        ]
    )
    path = folder / "unknown.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


def test_unknown_domain_op_is_refused_in_one_line(tmp_path, capsys):
    """graphquant checks every output in onnxruntime: a model it cannot run there is refused, naming the op."""
    source = unknown_domain_file(tmp_path)
    np.savez(tmp_path / "calib.npz", x=gaussian((16, 16)))
    (tmp_path / "out").mkdir()
    argv = [
        "optimize",
        "--recipe",
        "w8a8",
        str(source),
        "-o",
        str(tmp_path / "out" / "q.onnx"),
        "--calib",
        str(tmp_path / "calib.npz"),
    ]
    assert main(argv) == 1
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert line.startswith("graphquant: error: onnxruntime cannot load the model") and "FancyActivation" in line
    assert list((tmp_path / "out").iterdir()) == []


def test_unknown_domain_op_survives_weight_only_quantization_but_is_not_saved(tmp_path):
    """Without calibration nothing runs the model until save(), whose onnxruntime check refuses it."""
    model = graphquant.load(unknown_domain_file(tmp_path))
    result = graphquant.optimize(model, WEIGHT_ONLY, show_progress=False)
    (plugin,) = [node for node in result.model.graph if node.domain == "com.example.plugins"]
    assert (plugin.op_type, plugin.attributes["alpha"].value) == ("FancyActivation", 0.5)
    assert {status for status, _ in statuses(result).values()} == {"quantized"}
    with pytest.raises(OutputError, match="onnxruntime cannot load the output.*FancyActivation"):
        graphquant.save(result, tmp_path / "q.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unknown.onnx"]


# --- functions and control flow ---


FUNCTION = """
<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
with_function (float[N, 16] x) => (float[N, 8] y) {
  [fc1] h = MatMul(x, w1)
  [block] g = local.ScaledRelu(h)
  [fc2] y = MatMul(g, w2)
}
<domain: "local", opset_import: ["" : 17]>
ScaledRelu (a) => (b) {
  r = Relu(a)
  two = Constant<value = float {2.0}>()
  b = Mul(r, two)
}
"""


def test_model_local_function_is_kept_and_the_layers_around_it_quantize():
    generator = rng()
    proto = onnx.parser.parse_model(FUNCTION)
    proto.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(weights(generator, 16, 16), "w1"),
            onnx.numpy_helper.from_array(weights(generator, 16, 8), "w2"),
        ]
    )
    onnx.checker.check_model(proto)
    model = ir.serde.deserialize_model(proto)
    result = quantize_and_compare(model, [{"x": gaussian((8, 16), seed)} for seed in range(3)])
    assert {name: status for name, (status, _) in statuses(result).items()} == {"fc1": "quantized", "fc2": "quantized"}
    assert list(result.model.functions) == [("local", "ScaledRelu", "")]
    assert [node.op_type for node in result.model.functions[("local", "ScaledRelu", "")]] == ["Relu", "Constant", "Mul"]


def subgraph(
    name: str, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[str]
) -> onnx.GraphProto:
    """A body graph with float outputs of unknown shape."""
    return oh.make_graph(nodes, name, inputs, [oh.make_tensor_value_info(o, FLOAT, None) for o in outputs])


def control_flow_model() -> ir.Model:
    """A main MatMul, then If (a MatMul per branch), Loop (2 MatMul steps) and Scan (a MatMul per row), all on w."""
    generator = rng()
    then_branch = subgraph("then", [oh.make_node("MatMul", ["h", "w"], ["t"], name="then_fc")], [], ["t"])
    else_branch = subgraph("else", [oh.make_node("Relu", ["h"], ["e"])], [], ["e"])
    loop_body = subgraph(
        "loop",
        [
            oh.make_node("Identity", ["cond_in"], ["cond_out"]),
            oh.make_node("MatMul", ["carry_in", "w"], ["mm"], name="loop_fc"),
            oh.make_node("Tanh", ["mm"], ["carry_out"]),
        ],
        [
            oh.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
            oh.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
            oh.make_tensor_value_info("carry_in", FLOAT, None),
        ],
        ["cond_out", "carry_out"],
    )
    loop_body.output[0].type.tensor_type.elem_type = onnx.TensorProto.BOOL
    scan_body = subgraph(
        "scan",
        [
            oh.make_node("Unsqueeze", ["row", "zero"], ["row2"]),
            oh.make_node("MatMul", ["row2", "w"], ["out2"], name="scan_fc"),
            oh.make_node("Squeeze", ["out2", "zero"], ["out"]),
            oh.make_node("Add", ["sum_in", "out"], ["sum_out"]),
        ],
        [oh.make_tensor_value_info("sum_in", FLOAT, [16]), oh.make_tensor_value_info("row", FLOAT, [16])],
        ["sum_out", "out"],
    )
    nodes = [
        oh.make_node("MatMul", ["x", "w_in"], ["h"], name="fc_in"),
        oh.make_node("If", ["flag"], ["branch"], name="if", then_branch=then_branch, else_branch=else_branch),
        oh.make_node("Loop", ["trips", "true", "branch"], ["looped"], name="loop", body=loop_body),
        oh.make_node("Scan", ["zeros16", "looped"], ["total", "rows"], name="scan", body=scan_body, num_scan_inputs=1),
        oh.make_node("MatMul", ["rows", "w_out"], ["y"], name="fc_out"),
    ]
    constants = {
        "w_in": weights(generator, 16, 16),
        "w": weights(generator, 16, 16, scale=0.3),
        "w_out": weights(generator, 16, 4),
        "zero": np.array([0], np.int64),
        "trips": np.array(2, np.int64),
        "true": np.array(True),
        "zeros16": np.zeros(16, np.float32),
    }
    graph = oh.make_graph(
        nodes,
        "control_flow",
        [
            oh.make_tensor_value_info("x", FLOAT, ["N", 16]),
            oh.make_tensor_value_info("flag", onnx.TensorProto.BOOL, []),
        ],
        [oh.make_tensor_value_info("y", FLOAT, ["N", 4]), oh.make_tensor_value_info("total", FLOAT, [16])],
        [onnx.numpy_helper.from_array(array, name) for name, array in constants.items()],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


@pytest.mark.parametrize("recipe", ["w8a8", "outliertune"])
def test_layers_inside_if_loop_scan_stay_float_with_a_reason(recipe):
    model = control_flow_model()
    data = [{"x": gaussian((6, 16), seed), "flag": np.array(seed % 2 == 0)} for seed in range(4)]
    result = graphquant.optimize(model, recipe, calibration=data, show_progress=False)
    for feed in data + [{"x": gaussian((6, 16), 50), "flag": np.array(True)}]:
        for expected, got in zip(run(model, feed), run(result.model, feed), strict=True):
            assert cosine(expected, got) > 0.98
    found = statuses(result)
    assert found["fc_in"][0] == found["fc_out"][0] == "quantized"
    for inner in ("then_fc", "loop_fc", "scan_fc"):
        assert found[inner][0] == "float" and "subgraph of" in found[inner][1]
    inner_ops = [
        node.op_type
        for node in ir.traversal.RecursiveGraphIterator(result.model.graph)
        if node.graph is not result.model.graph
    ]
    assert "DequantizeLinear" not in inner_ops and inner_ops.count("MatMul") == 3


# --- dims ---


SYMBOLIC = """
<ir_version: 8, opset_import: ["" : 17]>
symbolic (float[batch, seq, 16] x) => (float[batch, seq, 8] y) {
  [ln] n = LayerNormalization<axis: int = -1>(x, gamma, beta)
  [fc1] h = MatMul(n, w1)
  r = Relu(h)
  [fc2] y = MatMul(r, w2)
}
"""


def test_symbolic_and_dynamic_dims_need_no_shape_inference():
    generator = rng()
    model = onnx.parser.parse_model(SYMBOLIC)
    model.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(np.ones(16, np.float32), "gamma"),
            onnx.numpy_helper.from_array(np.zeros(16, np.float32), "beta"),
            onnx.numpy_helper.from_array(weights(generator, 16, 16), "w1"),
            onnx.numpy_helper.from_array(weights(generator, 16, 8), "w2"),
        ]
    )
    model.graph.input[0].type.tensor_type.shape.dim[1].ClearField("dim_param")  # an unnamed, unknown dim
    model.graph.ClearField("value_info")
    ir_model = ir.serde.deserialize_model(model)
    data = [{"x": gaussian((batch, seq, 16), batch * 10 + seq)} for batch, seq in ((1, 5), (2, 3), (3, 9))]
    result = quantize_and_compare(ir_model, data, recipe="outliertune")
    assert {status for status, _ in statuses(result).values()} == {"quantized"}


# --- nothing to quantize, and layers that must stay float ---


def test_nothing_to_quantize_exits_0_writes_the_model_and_says_so(tmp_path, capsys):
    source = Path(save_model(relu_only(), tmp_path / "relu.onnx"))
    np.savez(tmp_path / "calib.npz", x=gaussian((8, 4)))
    output = tmp_path / "out.onnx"
    assert (
        main(["optimize", "--recipe", "w8a8", str(source), "-o", str(output), "--calib", str(tmp_path / "calib.npz")])
        == 0
    )
    captured = capsys.readouterr()
    assert [line for line in captured.out.splitlines() if "nothing to quantize" in line] == [
        "note: nothing to quantize: the model was written unchanged apart from clean-ups"
    ]
    assert captured.err == ""
    x = gaussian((3, 4), 1)
    np.testing.assert_array_equal(run(graphquant.load(output), {"x": x})[0], np.maximum(x, 0))


FALLBACK = """
<ir_version: 8, opset_import: ["" : 17]>
fallback (float[N, 16] x) => (float[N, 8] a, float[N, 8] b, float[2, N, 8] c, float[N, 8] d, float[N, 8] e) {
  [good] a = MatMul(x, w_good)
  [nan_weight] b = MatMul(x, w_nan)
  x3 = Unsqueeze(x, zero)
  x2 = Concat<axis: int = 0>(x3, x3)
  [rank3] c = MatMul(x2, w_rank3)
  [half] d = MatMul(x, w_half_f)
  [inf_weight] e = MatMul(x, w_inf)
}
"""


@pytest.mark.parametrize("recipe", ["w8a8", "outliertune"])
def test_layers_that_cannot_be_quantized_stay_float_with_a_reason(recipe):
    """Also under scale migration: the NaN/Inf layers share x with the good one, and must keep reading the original."""
    generator = rng()
    w_nan = weights(generator, 16, 8)
    w_nan[3, 2] = np.nan
    w_inf = weights(generator, 16, 8)
    w_inf[0, 0] = np.inf
    proto = onnx.parser.parse_model(FALLBACK.replace("w_half_f", "w_half_cast"))
    tensors = {
        "w_good": weights(generator, 16, 8),
        "w_nan": w_nan,
        "w_rank3": weights(generator, 2, 16, 8),
        "w_half": weights(generator, 16, 8).astype(np.float16),
        "w_inf": w_inf,
        "zero": np.array([0], np.int64),
    }
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(array, name) for name, array in tensors.items())
    proto.graph.node.insert(0, oh.make_node("Cast", ["w_half"], ["w_half_cast"], to=FLOAT))
    model = ir.serde.deserialize_model(proto)
    data = [{"x": gaussian((8, 16), seed)} for seed in range(3)]
    result = graphquant.optimize(model, recipe, calibration=data, show_progress=False)
    found = statuses(result)
    assert found["good"][0] == "quantized"
    assert found["rank3"][0] == "float" and "rank 3" in found["rank3"][1]
    assert found["half"][0] == "quantized"  # Cast(fp16 -> fp32) of a constant is folded into a float32 weight
    for name in ("nan_weight", "inf_weight"):
        assert found[name][0] == "float" and "NaN/Inf" in found[name][1]
    feed = {"x": gaussian((8, 16), 9)}
    expected, got = run(model, feed), run(result.model, feed)
    for index in (1, 2, 4):
        np.testing.assert_array_equal(got[index], expected[index])
    for index in (0, 3):
        assert cosine(expected[index], got[index]) > GOOD_LAYER_COSINE[recipe]


# The good layer's output cosine on this tiny model (3 calibration batches of 8 rows), measured, less a small margin.
GOOD_LAYER_COSINE = {"w8a8": 0.99, "outliertune": 0.985}


def test_float16_and_bfloat16_weights_stay_float():
    generator = rng()
    for dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
        name = dtype.name.lower()
        text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        low ({name}[N, 16] x) => ({name}[N, 8] y) {{
          [fc] y = MatMul(x, w)
        }}
        """
        proto = onnx.parser.parse_model(text)
        weight = ir.tensor(weights(generator, 16, 8).astype(np.float32), name="w")
        proto.graph.initializer.append(
            ir.serde.serialize_tensor(ir.Tensor(weight.numpy().astype(dtype.numpy()), dtype=dtype, name="w"))
        )
        model = ir.serde.deserialize_model(proto)
        result = graphquant.optimize(model, WEIGHT_ONLY, show_progress=False)
        ((status, reason),) = statuses(result).values()
        assert status == "float" and "only float32 is quantized" in reason
        assert [node.op_type for node in result.model.graph] == ["MatMul"]
