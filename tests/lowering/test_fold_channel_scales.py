"""FoldChannelScalesPass: a quantized branch's per-channel Mul folded into the layer and GELU that make its input."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from builders import gaussian_feeds, gelu_mlp, ops, run, sqnr_db
from onnx import TensorProto, helper, numpy_helper

from graphquant.analysis.calibration import Calibrator
from graphquant.lowering import TARGETS
from graphquant.lowering.contiguous_routes import ContiguousFloatRoutesPass
from graphquant.lowering.fold_channel_scales import FoldChannelScalesPass
from graphquant.lowering.ort_cpu import OrtCpuLoweringPass
from graphquant.passes.preexecute_dequant import PreexecuteDequantPass
from graphquant.passes.quantize import QuantizePass

HELD_OUT = gaussian_feeds(911, batches=3, features=8)


def routed_and_lowered(model: ir.Model) -> ir.Model:
    """Forced float routes (two channels per group), quantized, lowered to ort-cpu with contiguous routes."""
    shared = Calibrator.for_model(model, gaussian_feeds(910, batches=4, features=8), show_progress=False)
    PreexecuteDequantPass(shared, float_channels=2, float_route_below_db=1000, max_float_fraction=0.5)(model)
    QuantizePass(shared)(model)
    OrtCpuLoweringPass()(model)
    ContiguousFloatRoutesPass()(model)
    return model


def test_the_hidden_branch_mul_folds_into_the_gelu_and_the_outputs_agree():
    lowered = routed_and_lowered(gelu_mlp(4))
    reference = lowered.clone()
    (branch,) = [n for n in lowered.graph if n.op_type == "Mul" and n.inputs[0].name == "gs"]
    factor = branch.inputs[1].const_value.numpy()
    assert (factor == 0).sum() == 2  # the routed channels are zeroed on the quantized branch
    assert FoldChannelScalesPass()(lowered).modified
    onnx.checker.check_model(ir.to_proto(lowered))
    assert ops(lowered).count("Mul") == ops(reference).count("Mul") - 1  # x's branch stays: x is a graph input
    quantize = next(n for n in lowered.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == "gs")
    assert (
        quantize.inputs[1].const_value.numpy()
        == reference.graph.initializers[quantize.inputs[1].name].const_value.numpy()
    )
    folded = np.where(factor == 0, 1.0, factor)
    for output, index, scale in (("e2", 0, 0.5), ("gs", 1, None)):
        got = next(n for n in lowered.graph if n.outputs[0].name == output).inputs[index].const_value.numpy()
        before = next(n for n in reference.graph if n.outputs[0].name == output).inputs[index].const_value.numpy()
        np.testing.assert_allclose(got, (scale if scale is not None else before) * folded, rtol=1e-6)
    for feed in HELD_OUT:
        assert sqnr_db(run(reference, feed)[0], run(lowered, feed)[0]) > 60  # float rounding only


def mlp_graph(factor: np.ndarray, reader_rows: np.ndarray) -> ir.Model:
    """a (uint8 codes) -> MatMulIntegerToFloat -> Add(shift) -> Mul(factor) -> QuantizeLinear -> MatMulIntegerToFloat."""
    rng = np.random.default_rng(5)
    constants = {
        "w1": rng.integers(-127, 128, (8, 4)).astype(np.int8),
        "w1_scale": np.full(4, 0.01, np.float32),
        "a_scale": np.array(0.02, np.float32),
        "a_zero": np.array(128, np.uint8),
        "bias": rng.standard_normal(4).astype(np.float32),
        "shift": rng.standard_normal(4).astype(np.float32),
        "factor": factor.astype(np.float32),
        "q_scale": np.array(0.05, np.float32),
        "q_zero": np.array(128, np.uint8),
        "w2": reader_rows.astype(np.int8),
        "w2_scale": np.full(3, 0.01, np.float32),
    }
    nodes = [
        helper.make_node(
            "MatMulIntegerToFloat",
            ["a", "w1", "a_scale", "w1_scale", "a_zero", "", "bias"],
            ["h"],
            domain="com.microsoft",
        ),
        helper.make_node("Add", ["h", "shift"], ["hs"]),
        helper.make_node("Mul", ["hs", "factor"], ["hm"]),
        helper.make_node("QuantizeLinear", ["hm", "q_scale", "q_zero"], ["hq"]),
        helper.make_node(
            "MatMulIntegerToFloat", ["hq", "w2", "q_scale", "w2_scale", "q_zero"], ["y"], domain="com.microsoft"
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(array, name) for name, array in constants.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=opsets))


def code_feeds() -> list[dict[str, np.ndarray]]:
    """Random uint8 activation codes."""
    rng = np.random.default_rng(6)
    return [{"a": rng.integers(0, 256, (32, 8)).astype(np.uint8)} for _ in range(3)]


def test_a_factor_without_zeros_folds_into_the_layer_scales_and_bias():
    rows = np.random.default_rng(7).integers(-127, 128, (4, 3))
    model = mlp_graph(np.array([0.5, 2.0, 1.5, 0.25]), rows)
    reference = model.clone()
    assert FoldChannelScalesPass()(model).modified
    assert "Mul" not in ops(model)
    producer = next(n for n in model.graph if n.outputs[0].name == "h")
    np.testing.assert_allclose(producer.inputs[3].const_value.numpy(), 0.01 * np.array([0.5, 2.0, 1.5, 0.25]))
    for feed in code_feeds():
        np.testing.assert_allclose(run(reference, feed)[0], run(model, feed)[0], rtol=1e-5, atol=1e-5)


def test_a_zeroed_channel_folds_only_where_the_readers_weight_rows_are_zero():
    factor = np.array([0.5, 0.0, 1.5, 0.25])
    rows = np.random.default_rng(8).integers(-127, 128, (4, 3))
    assert not FoldChannelScalesPass()(mlp_graph(factor, rows)).modified  # row 1 is not zero: its codes count
    rows[1] = 0
    model = mlp_graph(factor, rows)
    reference = model.clone()
    assert FoldChannelScalesPass()(model).modified
    for feed in code_feeds():
        np.testing.assert_allclose(run(reference, feed)[0], run(model, feed)[0], rtol=1e-5, atol=1e-5)


def test_the_ort_cpu_target_folds_after_renumbering_the_routes():
    steps = list(TARGETS["ort-cpu"])
    assert steps.index(ContiguousFloatRoutesPass) + 1 == steps.index(FoldChannelScalesPass)
