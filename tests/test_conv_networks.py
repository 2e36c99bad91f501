"""Small CNNs (residual, depthwise-separable, grouped, ConvTranspose, ReLU6) through w8a8 on every target."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import graphquant
from builders import build, ops, run, weights

F32 = np.float32
TARGETS = ("qdq", "ort-cpu", "qoperator")


def bn(rng: np.random.Generator, prefix: str, channels: int) -> dict[str, np.ndarray]:
    """Inference BatchNormalization parameters (gamma, beta, running mean and variance)."""
    return {
        f"{prefix}_g": (1.0 + 0.2 * rng.standard_normal(channels)).astype(F32),
        f"{prefix}_b": (0.1 * rng.standard_normal(channels)).astype(F32),
        f"{prefix}_m": (0.1 * rng.standard_normal(channels)).astype(F32),
        f"{prefix}_v": (0.5 + rng.random(channels)).astype(F32),
    }


def bn_call(prefix: str, source: str) -> str:
    return f"BatchNormalization({source}, {prefix}_g, {prefix}_b, {prefix}_m, {prefix}_v)"


RESIDUAL = f"""
<ir_version: 8, opset_import: ["" : 17]>
residual (float[N, 8, 8, 8] x) => (float[N, 8, 8, 8] y) {{
  [conv1] c1 = Conv<pads: ints = [1, 1, 1, 1], kernel_shape: ints = [3, 3]>(x, w1)
  [bn1] n1 = {bn_call("bn1", "c1")}
  [relu1] r1 = Relu(n1)
  [conv2] c2 = Conv<pads: ints = [1, 1, 1, 1], kernel_shape: ints = [3, 3]>(r1, w2)
  [bn2] n2 = {bn_call("bn2", "c2")}
  [skip] s = Add(n2, x)
  [relu_out] y = Relu(s)
}}
"""

SEPARABLE = f"""
<ir_version: 8, opset_import: ["" : 17]>
separable (float[N, 8, 8, 8] x) => (float[N, 16, 8, 8] y) {{
  [depthwise] d = Conv<group: int = 8, pads: ints = [1, 1, 1, 1], kernel_shape: ints = [3, 3]>(x, wd)
  [bn_d] nd = {bn_call("bnd", "d")}
  [relu6] r = Clip(nd, zero, six)
  [pointwise] p = Conv<kernel_shape: ints = [1, 1]>(r, wp)
  [bn_p] y = {bn_call("bnp", "p")}
}}
"""

GROUPED = """
<ir_version: 8, opset_import: ["" : 17]>
grouped (float[N, 8, 8, 8] x) => (float[N, 8, 8, 8] y) {
  [grouped1] g = Conv<group: int = 2, pads: ints = [1, 1, 1, 1], kernel_shape: ints = [3, 3]>(x, wg, bg)
  [relu] r = Relu(g)
  [grouped2] y = Conv<group: int = 4, kernel_shape: ints = [1, 1]>(r, wh, bh)
}
"""

TRANSPOSED = f"""
<ir_version: 8, opset_import: ["" : 17]>
transposed (float[N, 8, 4, 4] x) => (float[N, 4, 8, 8] y) {{
  [up] u = ConvTranspose<strides: ints = [2, 2], kernel_shape: ints = [2, 2]>(x, wu, bu)
  [bn_u] nu = {bn_call("bnu", "u")}
  [relu] r = Relu(nu)
  [up_grouped] y = ConvTranspose<group: int = 2, kernel_shape: ints = [3, 3], pads: ints = [1, 1, 1, 1]>(r, wt)
}}
"""


def networks(name: str) -> tuple[ir.Model, tuple[int, ...]]:
    """One of the test CNNs with seeded weights, and its input shape per batch."""
    rng = np.random.default_rng(0)
    if name == "residual":
        init = {"w1": weights(rng, 8, 8, 3, 3, scale=0.2), "w2": weights(rng, 8, 8, 3, 3, scale=0.2)}
        return build(RESIDUAL, {**init, **bn(rng, "bn1", 8), **bn(rng, "bn2", 8)}), (4, 8, 8, 8)
    if name == "separable":
        init = {"wd": weights(rng, 8, 1, 3, 3), "wp": weights(rng, 16, 8, 1, 1), "zero": F32(0), "six": F32(6)}
        return build(SEPARABLE, {**init, **bn(rng, "bnd", 8), **bn(rng, "bnp", 16)}), (4, 8, 8, 8)
    if name == "grouped":
        init = {"wg": weights(rng, 8, 4, 3, 3, scale=0.3), "bg": weights(rng, 8, scale=0.1)}
        return build(GROUPED, {**init, "wh": weights(rng, 8, 2, 1, 1), "bh": weights(rng, 8, scale=0.1)}), (4, 8, 8, 8)
    init = {"wu": weights(rng, 8, 8, 2, 2), "bu": weights(rng, 8, scale=0.1), "wt": weights(rng, 8, 2, 3, 3)}
    return build(TRANSPOSED, {**init, **bn(rng, "bnu", 8)}), (4, 8, 4, 4)


def image_batches(seed: int, shape: tuple[int, ...], batches: int) -> Iterator[dict[str, np.ndarray]]:
    """A one-shot generator of Gaussian image batches."""
    rng = np.random.default_rng(seed)
    for _ in range(batches):
        yield {"x": rng.standard_normal(shape).astype(F32)}


def cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.dot(reference.ravel(), candidate.ravel()) / np.linalg.norm(reference) / np.linalg.norm(candidate))


# Output cosine vs float on held-out batches, lowest over the targets as measured: residual 0.99983, separable
# 0.99981, grouped 0.99947, transposed 0.99949 (the integer targets requantize each Conv output, QDQ does not).
# The floors allow about 5x the measured distance from 1.
MIN_COSINE = {"residual": 0.999, "separable": 0.999, "grouped": 0.997, "transposed": 0.997}
# Ops that each target must have produced (integer ops where the target has them).
EXPECTED_INTEGER_OPS = {
    "residual": {"ort-cpu": {"QLinearConv": 2}, "qoperator": {"QLinearConv": 2}},
    "separable": {"ort-cpu": {"QLinearConv": 2}, "qoperator": {"QLinearConv": 2}},
    "grouped": {"ort-cpu": {"QLinearConv": 2}, "qoperator": {"QLinearConv": 2}},
    "transposed": {"ort-cpu": {"ConvTranspose": 2}, "qoperator": {"ConvTranspose": 2}},  # no QLinearConvTranspose
}
# Activations that stay after lowering: the Relu after the residual Add feeds the graph output in float.
REMAINING_ACTIVATIONS = {
    "residual": {"qdq": ["Relu", "Relu"], "ort-cpu": ["Relu"], "qoperator": ["Relu"]},
    "separable": {"qdq": ["Clip"], "ort-cpu": [], "qoperator": []},
    "grouped": {"qdq": ["Relu"], "ort-cpu": [], "qoperator": []},
    "transposed": {"qdq": ["Relu"], "ort-cpu": [], "qoperator": []},
}


@pytest.mark.parametrize("name", ["residual", "separable", "grouped", "transposed"])
def test_cnn_quantizes_and_runs_on_every_target(name):
    model, shape = networks(name)
    held_out = list(image_batches(99, shape, 2))
    expected = np.concatenate([run(model, feed)[0] for feed in held_out])
    for target in TARGETS:
        result = graphquant.optimize(
            model, "w8a8", image_batches(1, shape, 4), target=target, validation=held_out, show_progress=False
        )
        lowered = result.model
        onnx.checker.check_model(ir.to_proto(lowered))
        assert "BatchNormalization" not in ops(lowered)  # folded into the layers before quantization
        layers = {layer.node: layer.status for layer in result.report.layers}
        assert set(layers.values()) == {"quantized"} and len(layers) == 2
        activations = [op for op in ops(lowered) if op in ("Relu", "Clip") and op in ops(model)]
        assert activations == REMAINING_ACTIVATIONS[name][target]
        for op, count in EXPECTED_INTEGER_OPS[name].get(target, {}).items():
            assert ops(lowered).count(op) == count
        if target == "qdq":
            assert ops(lowered).count("DequantizeLinear") >= 4  # two weights, two activations
        got = np.concatenate([run(lowered, feed)[0] for feed in held_out])
        assert cosine(expected, got) > MIN_COSINE[name], (target, cosine(expected, got))
        assert np.abs(got - expected).max() > 1e-4  # quantized for real


def test_grouped_conv_transpose_is_per_tensor_and_says_why():
    model, shape = networks("transposed")
    result = graphquant.optimize(model, "w8a8", image_batches(1, shape, 2), show_progress=False)
    schemes = {layer.node: layer.scheme for layer in result.report.layers}
    assert schemes["up"].startswith("W8 per-channel")
    assert schemes["up_grouped"].startswith("W8 per-tensor (grouped ConvTranspose")
    scales = {
        node.name: node.inputs[1].producer().inputs[1].const_value.numpy()
        for node in result.model.graph
        if node.op_type == "ConvTranspose"
    }
    assert scales["up"].shape == (8,) and scales["up_grouped"].shape == ()
