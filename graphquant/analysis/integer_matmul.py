"""Exact products of 8-bit codes for scheme scoring: onnxruntime's integer GEMM where it is exact on this CPU."""

from __future__ import annotations

import functools

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from graphquant.analysis.runner import session_options

# The probe's depth: deep enough that saturating int16 pair sums (vpmaddubsw on AVX2 without VNNI) would show.
PROBE_DEPTH = 64


def integer_matmul(codes: np.ndarray, zero_point: int, weight_codes: np.ndarray) -> np.ndarray:
    """(codes - zero_point) · weight_codes in int32, for uint8 ``codes`` [M, K] and int8 ``weight_codes`` [K, N].

    onnxruntime's MatMulInteger where a probe showed it exact on this CPU (uint8 x int8 saturates on AVX2 without
    VNNI); else numpy's float64 GEMM of the codes, exact too (every partial sum is an integer below 2**53).
    """
    if _exact_on_this_cpu():
        feeds = {"a": codes, "a_zero": np.array(zero_point, np.uint8), "b": weight_codes}
        return _session().run(None, feeds)[0]
    shifted = codes.astype(np.float64)
    shifted -= zero_point
    return (shifted @ weight_codes.astype(np.float64)).astype(np.int32)


@functools.cache
def _session() -> ort.InferenceSession:
    """One MatMulInteger session on one thread, for any M, K and N."""
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b", "a_zero"], ["y"])],
        "integer_matmul",
        [
            helper.make_tensor_value_info("a", TensorProto.UINT8, ["M", "K"]),
            helper.make_tensor_value_info("b", TensorProto.INT8, ["K", "N"]),
            helper.make_tensor_value_info("a_zero", TensorProto.UINT8, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["M", "N"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = session_options()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@functools.cache
def _exact_on_this_cpu() -> bool:
    """Whether MatMulInteger gives the exact product on the extreme codes (255 and 0 against ±127)."""
    rng = np.random.default_rng(0)
    codes = rng.choice(np.array([0, 1, 254, 255], np.uint8), (16, PROBE_DEPTH))
    codes[0] = 255
    weight_codes = rng.choice(np.array([-127, 127], np.int8), (PROBE_DEPTH, 16))
    weight_codes[:, 0] = 127
    expected = (codes.astype(np.int64) - 128) @ weight_codes.astype(np.int64)
    feeds = {"a": codes, "a_zero": np.array(128, np.uint8), "b": weight_codes}
    return bool(np.array_equal(_session().run(None, feeds)[0], expected))
