"""Graphs as real exporters write them: Constant nodes, old opsets, fused CNN layers, blocked W8A8 on every target."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnx_ir as ir
import pytest
from builders import build, by_name, output_sqnr_db, run, sqnr_db, weights

import graphquant
from graphquant import validate
from graphquant.analysis import runner
from graphquant.analysis.stats_cache import CachingCalibrator
from graphquant.errors import RecipeError
from graphquant.passes.upgrade_opset import UpgradeOpsetPass

TARGETS = ("qdq", "ort-cpu", "qoperator")
BACKEND = Path(onnx.__file__).parent / "backend" / "test" / "data"


def gaussian(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def dropout_mlp() -> ir.Model:
    """An opset-9 MLP with Dropout(ratio) between its layers: the opset upgrade turns the ratio into a Constant."""
    rng = np.random.default_rng(0)
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        onnx.helper.make_node("Relu", ["h"], ["r"], name="relu"),
        onnx.helper.make_node("Dropout", ["r"], ["d"], name="dropout", ratio=0.1),
        onnx.helper.make_node("MatMul", ["d", "w2"], ["y"], name="fc2"),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "dropout_mlp",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
        [
            onnx.numpy_helper.from_array(weights(rng, 16, 32), "w1"),
            onnx.numpy_helper.from_array(weights(rng, 32, 4), "w2"),
        ],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 9)], ir_version=4)
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def quantized_on_every_target(model: ir.Model, data: list[dict[str, np.ndarray]]) -> dict[str, ir.Model]:
    """The w8a8 result of each target."""
    return {
        target: graphquant.optimize(model, "w8a8", data, target=target, show_progress=False).model for target in TARGETS
    }


def test_opset9_dropout_quantizes_on_every_target():
    model = dropout_mlp()
    data = [{"x": gaussian((16, 16), seed)} for seed in range(3)]
    held_out = [{"x": gaussian((16, 16), 10 + seed)} for seed in range(2)]
    upgraded = model.clone()
    UpgradeOpsetPass()(upgraded)
    assert [node.op_type for node in upgraded.graph].count("Constant") == 1  # Dropout-13's ratio, before folding
    results = quantized_on_every_target(model, data)
    for target, quantized in results.items():
        assert output_sqnr_db(model, quantized, held_out) > 30, target
    for target in ("ort-cpu", "qoperator"):  # the integer forms compute what QDQ does
        assert output_sqnr_db(results["qdq"], results[target], held_out) > 40, target


def test_legacy_torch_export_with_constant_nodes_quantizes_on_every_target():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2((torch.relu(self.fc1(x)) * 0.5).reshape(x.shape[0], -1))

    buffer = io.BytesIO()
    module = Block().eval()
    torch.onnx.export(
        module, (torch.randn(2, 16),), buffer, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "N"}}
    )
    model = ir.serde.deserialize_model(onnx.load_from_string(buffer.getvalue()))
    assert "Constant" in {node.op_type for node in model.graph}
    data = [{"x": gaussian((16, 16), seed)} for seed in range(3)]
    x = gaussian((32, 16), 10)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    for target, quantized in quantized_on_every_target(model, data).items():
        assert sqnr_db(expected, run(quantized, {"x": x})[0]) > 30, target


def test_opset6_gemm_is_validated_against_the_upgraded_float_model():
    folder = BACKEND / "pytorch-converted" / "test_Linear"
    model = graphquant.load(folder / "model.onnx")
    assert model.opset_imports[""] == 6
    inputs = onnx.numpy_helper.to_array(onnx.load_tensor(str(folder / "test_data_set_0" / "input_0.pb")))
    expected = onnx.numpy_helper.to_array(onnx.load_tensor(str(folder / "test_data_set_0" / "output_0.pb")))
    for target in TARGETS:
        result = graphquant.optimize(model, "w8a8", str(folder), target=target, show_progress=False)
        (note,) = [note for note in result.report.notes if note.startswith("validated against")]
        assert "(opset 6 -> 13)" in note and "cannot load the original model (the input)" in note and "Gemm(6)" in note
        (name,) = result.report.outputs
        (got,) = run(result.model, {result.model.graph.inputs[0].name: inputs})
        assert result.report.outputs[name].sqnr_db == pytest.approx(sqnr_db(expected, got), abs=0.01)
        assert result.report.outputs[name].sqnr_db > 30


RESNET_BLOCK = """
<ir_version: 8, opset_import: ["" : 17]>
resnet (float[N, 3, 12, 12] x) => (float[N, 10] y) {
  [stem] s = Conv<kernel_shape: ints = [3, 3], pads: ints = [1, 1, 1, 1]>(x, w_stem, b_stem)
  [stem_relu] sr = Relu(s)
  [conv_a] a = Conv<kernel_shape: ints = [1, 1]>(sr, w_a, b_a)
  [relu_a] ar = Relu(a)
  [conv_b] b = Conv<kernel_shape: ints = [3, 3], pads: ints = [1, 1, 1, 1]>(ar, w_b, b_b)
  [relu_b] br = Relu(b)
  [conv_c] c = Conv<kernel_shape: ints = [1, 1]>(br, w_c, b_c)
  [residual] t = Add(c, sr)
  [block_relu] tr = Relu(t)
  [pool] p = GlobalAveragePool(tr)
  [flatten] f = Flatten(p)
  [fc] y = Gemm<transB: int = 1>(f, w_fc, b_fc)
}
"""


def resnet_block() -> ir.Model:
    """A stem conv and one bottleneck (1x1, 3x3, 1x1 convs with Relus) with its residual, pooling and an FC layer."""
    rng = np.random.default_rng(1)
    shapes = {"stem": (16, 3, 3, 3), "a": (8, 16, 1, 1), "b": (8, 8, 3, 3), "c": (16, 8, 1, 1), "fc": (10, 16)}
    initializers = {}
    for name, shape in shapes.items():
        initializers[f"w_{name}"] = weights(rng, *shape, scale=float(np.sqrt(2 / np.prod(shape[1:]))))
        initializers[f"b_{name}"] = weights(rng, shape[0], scale=0.1)
    return build(RESNET_BLOCK, initializers)


def test_every_quantized_cnn_layer_is_measured_even_when_its_codes_feed_the_next_conv():
    model = resnet_block()
    data = [{"x": gaussian((4, 3, 12, 12), seed)} for seed in range(3)]
    report = graphquant.optimize(model, "w8a8", data, target="ort-cpu", show_progress=False).report
    quantized = [layer.node for layer in report.quantized]
    assert quantized == ["stem", "conv_a", "conv_b", "conv_c", "fc"] and report.kept_float == []
    assert set(report.layer_metrics) == set(quantized)
    worst = min(report.layer_metrics, key=lambda name: report.layer_metrics[name].sqnr_db)
    assert report.worst_layer() == (worst, report.layer_metrics[worst].sqnr_db)


@pytest.mark.parametrize("bits", [8, 6])
def test_a_fused_layer_is_measured_on_its_dequantized_codes_against_the_reference_activation(bits):
    model = resnet_block()
    data = [{"x": gaussian((4, 3, 12, 12), seed)} for seed in range(3)]
    wide = [{"x": gaussian((4, 3, 12, 12), 10 + seed) * 3} for seed in range(2)]  # beyond the calibrated ranges
    result = graphquant.optimize(
        model, "w8a8", data, validation=wide, target="ort-cpu", wbits=bits, abits=bits, show_progress=False
    )
    conv_a = by_name(result.model)["conv_a"]
    assert conv_a.op_type == "QLinearConv" and "a" not in {v.name for n in result.model.graph for v in n.outputs}
    scale, zero_point = (float(conv_a.inputs[i].const_value.numpy()) for i in (6, 7))
    assert zero_point == 0  # the fused Relu's grid
    probe_model, reference = result.model.clone(), model.clone()
    probe_model.graph.outputs.append(probe_model.graph.node("conv_a").outputs[0])
    reference.graph.outputs.append(reference.graph.node("relu_a").outputs[0])
    codes = np.concatenate([run(probe_model, feed)[1] for feed in wide]).astype(np.float64)
    assert codes.max() > 2**bits - 1 if bits < 8 else codes.max() == 255  # saturated codes the next Clip cuts
    expected = np.concatenate([run(reference, feed)[1] for feed in wide])
    dequantized = np.clip(codes, 0, 2**bits - 1) * scale
    assert result.report.layer_metrics["conv_a"].sqnr_db == pytest.approx(sqnr_db(expected, dequantized), abs=1e-3)


def test_a_fused_layers_reference_activation_is_recorded_with_the_calibration(monkeypatch):
    """A model that runs unoptimized (here: forced) records the Relu after a fused conv too, for its codes probe."""
    monkeypatch.setattr(runner, "SHARED_MODEL_BYTES", 0)
    model = resnet_block()
    data = [{"x": gaussian((4, 3, 12, 12), seed)} for seed in range(3)]
    options = {"target": "ort-cpu", "show_progress": False}
    with monkeypatch.context() as patch:
        patch.setattr(CachingCalibrator, "expect_reference", lambda self, model, names: None)
        ran = graphquant.optimize(model, "w8a8", data, **options)
    monkeypatch.setattr(validate, "recorded_runs", None)  # the reference run would fail
    reused = graphquant.optimize(model, "w8a8", data, **options)
    assert by_name(reused.model)["conv_a"].op_type == "QLinearConv"
    assert reused.report.layer_metrics["conv_a"].as_dict() == ran.report.layer_metrics["conv_a"].as_dict()
    assert {n: c.as_dict() for n, c in reused.report.outputs.items()} == {
        n: c.as_dict() for n, c in ran.report.outputs.items()
    }


LINEARS = """
<ir_version: 8, opset_import: ["" : 17]>
linears (float[N, 64] x) => (float[N, 8] y) {
  [fc1] h = MatMul(x, w1)
  [fc2] y = MatMul(h, w2)
}
"""


def linears() -> ir.Model:
    rng = np.random.default_rng(2)
    return build(LINEARS, {"w1": weights(rng, 64, 64), "w2": weights(rng, 64, 8)})


def test_blocked_w8a8_lowers_to_matmul_nbits_on_ort_cpu():
    model = linears()
    data = [{"x": gaussian((16, 64), seed)} for seed in range(3)]
    result = graphquant.optimize(model, "w8a8", data, target="ort-cpu", block_size=32, show_progress=False)
    assert [node.op_type for node in result.model.graph].count("MatMulNBits") == 2
    assert all(
        node.attributes.get_int("block_size") == 32 for node in result.model.graph if node.op_type == "MatMulNBits"
    )
    held_out = [{"x": gaussian((16, 64), 10 + seed)} for seed in range(2)]
    assert output_sqnr_db(model, result.model, held_out) > 30


@pytest.mark.parametrize("target", ["qdq", "qoperator"])
def test_blocked_w8a8_is_refused_before_any_work_where_no_form_runs(target):
    def untouchable():
        raise AssertionError("the calibration data was read")
        yield

    with pytest.raises(RecipeError, match=rf"block_size 32.*no working form on target '{target}'"):
        graphquant.optimize(linears(), "w8a8", untouchable(), target=target, block_size=32, show_progress=False)
