"""load: unusual but valid models pass its checks with their values intact (the bad ones are in test_bad_inputs.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnx.parser
import pytest
from builders import run

from graphquant.frontends.onnx_file import load

X = np.linspace(-2.0, 2.0, 32, dtype=np.float32).reshape(2, 16)
W = (np.arange(256, dtype=np.float32).reshape(16, 16) - 128) / 64


def typed_tensor(name: str, data_type: int, dims: list[int], values: list) -> onnx.TensorProto:
    """A tensor stored in its typed field (int32_data, float_data, string_data...) rather than raw bytes."""
    return onnx.helper.make_tensor(name, data_type, dims, values, raw=False)


def unsorted_graph() -> onnx.ModelProto:
    """Nodes listed consumer first: valid for onnxruntime, and graphquant sorts them later."""
    proto = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]>\ng (float[N, 16] x) => (float[N, 16] y) {\n'
        "  h = MatMul(x, w)\n  y = Relu(h)\n}"
    )
    proto.graph.node.reverse()
    proto.graph.initializer.append(onnx.numpy_helper.from_array(W, "w"))
    return proto


def legacy_initializers_as_inputs() -> onnx.ModelProto:
    """IR version 3: the weight is an initializer and a graph input of the same name."""
    proto = onnx.parser.parse_model(
        '<ir_version: 3, opset_import: ["" : 9]>\ng (float[N, 16] x, float[16, 16] w) => (float[N, 16] y) {\n'
        "  y = MatMul(x, w)\n}"
    )
    proto.graph.initializer.append(onnx.numpy_helper.from_array(W, "w"))
    return proto


def outer_scope_subgraph() -> onnx.ModelProto:
    """An If whose branches read the weight and the input from the outer graph."""
    then_out = onnx.helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, ["N", 16])
    else_out = onnx.helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, ["N", 16])
    then_branch = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["t"])], "then", [], [then_out])
    else_branch = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["e"])], "else", [], [else_out])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("If", ["flag"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 16])],
        [onnx.numpy_helper.from_array(W, "w"), onnx.numpy_helper.from_array(np.array(True), "flag")],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def local_function() -> onnx.ModelProto:
    """A model-local function with an inline Constant, called from the main graph."""
    constant = onnx.numpy_helper.from_array(W, "c")
    function = onnx.helper.make_function(
        "local",
        "Project",
        ["a"],
        ["b"],
        [
            onnx.helper.make_node("Constant", [], ["c"], value=constant),
            onnx.helper.make_node("MatMul", ["a", "c"], ["b"]),
        ],
        [onnx.helper.make_opsetid("", 17)],
    )
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Project", ["x"], ["y"], domain="local")],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 16])],
    )
    opsets = [onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("local", 1)]
    return onnx.helper.make_model(graph, opset_imports=opsets, functions=[function])


def typed_fields() -> onnx.ModelProto:
    """Initializers in typed fields: float16 and bool in int32_data, complex pairs, strings, packed int4."""
    proto = onnx.parser.parse_model(
        '<ir_version: 10, opset_import: ["" : 21]>\ng (float[N, 16] x) => (float[N, 16] y) {\n  y = MatMul(x, w)\n}'
    )
    proto.graph.initializer.extend(
        [
            typed_tensor("w", onnx.TensorProto.FLOAT, [16, 16], W.ravel().tolist()),
            typed_tensor("half", onnx.TensorProto.FLOAT16, [3], [1.0, -2.0, 0.5]),
            typed_tensor("flags", onnx.TensorProto.BOOL, [2], [True, False]),
            typed_tensor("pairs", onnx.TensorProto.COMPLEX64, [2], [1 + 2j, -3j]),
            typed_tensor("words", onnx.TensorProto.STRING, [2], [b"alpha", b"beta"]),
            typed_tensor("nibbles", onnx.TensorProto.INT4, [5], [1, -2, 3, -8, 7]),
        ]
    )
    return proto


VALID: dict[str, Callable[[], onnx.ModelProto]] = {
    "unsorted-graph": unsorted_graph,
    "legacy-initializers-as-inputs": legacy_initializers_as_inputs,
    "outer-scope-subgraph": outer_scope_subgraph,
    "local-function": local_function,
    "typed-fields": typed_fields,
}


@pytest.mark.parametrize("kind", sorted(VALID))
def test_unusual_valid_models_load_with_their_values(tmp_path: Path, kind: str):
    proto = VALID[kind]()
    path = tmp_path / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    model = load(path)
    for tensor in proto.graph.initializer:
        expected, loaded = onnx.numpy_helper.to_array(tensor), model.graph.initializers[tensor.name].const_value.numpy()
        if expected.dtype == object:  # strings: onnx gives str, onnx_ir bytes
            expected, loaded = expected.astype(str), loaded.astype(str)
        np.testing.assert_array_equal(loaded, expected)
    (y,) = run(model, {"x": X})
    np.testing.assert_allclose(y, X @ W, rtol=1e-6)  # the If takes its MatMul branch: its flag is True
