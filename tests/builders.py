"""Small model builders and an onnxruntime runner shared by the tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort


def build(text: str, initializers: dict[str, np.ndarray] | None = None) -> ir.Model:
    """An onnx_ir model from onnx.parser text plus named numpy initializers."""
    proto = onnx.parser.parse_model(text)
    for name, array in (initializers or {}).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def run(model: ir.Model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a model in onnxruntime on the CPU and return its outputs."""
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def weights(rng: np.random.Generator, *shape: int, scale: float = 0.5) -> np.ndarray:
    """Gaussian float32 weights."""
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def outlier_activations(rng: np.random.Generator, samples: int, channels: int, outliers: int = 2) -> np.ndarray:
    """Float32 activations whose first ``outliers`` channels are 30x larger and off-centre."""
    data = rng.standard_normal((samples, channels)).astype(np.float32)
    data[:, :outliers] = data[:, :outliers] * 30.0 + 50.0
    return data


MLP = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[N, 16] x) => (float[N, 4] y) {
  h = MatMul(x, w1)
  hb = Add(h, b1)
  r = Relu(hb)
  y = Gemm<transB: int = 1>(r, w2, b2)
}
"""


def mlp(rng: np.random.Generator) -> ir.Model:
    """x -> MatMul+Add -> Relu -> Gemm(transB) -> y, with 16 inputs, 8 hidden, 4 outputs."""
    return build(
        MLP,
        {"w1": weights(rng, 16, 8), "b1": weights(rng, 8), "w2": weights(rng, 4, 8), "b2": weights(rng, 4)},
    )


def save_model(model: ir.Model, path) -> str:
    """Write a model to ``path`` (a single .onnx file) and return the path as a string."""
    ir.save(model, str(path))
    return str(path)


def mlp_reference(model: ir.Model, x: np.ndarray) -> np.ndarray:
    """The float output of :func:`mlp`'s graph computed in numpy from the model's own initializers."""
    init = {name: value.const_value.numpy() for name, value in model.graph.initializers.items()}
    hidden = np.maximum(x @ init["w1"] + init["b1"], 0.0)
    return (hidden @ init["w2"].T + init["b2"]).astype(np.float32)


NAMED_MLP = """
<ir_version: 8, opset_import: ["" : 17]>
named_mlp (float[N, 16] x) => (float[N, 4] y) {
  [fc1] h = MatMul(x, w1)
  [bias1] hb = Add(h, b1)
  [act] r = Relu(hb)
  [fc2] y = Gemm<transB: int = 1>(r, w2, b2)
}
"""


def named_mlp(rng: np.random.Generator) -> ir.Model:
    """:func:`mlp` with node names fc1 (MatMul), bias1, act and fc2 (Gemm, transB), for overrides."""
    return build(
        NAMED_MLP,
        {"w1": weights(rng, 16, 8), "b1": weights(rng, 8), "w2": weights(rng, 4, 8), "b2": weights(rng, 4)},
    )


QKV = """
<ir_version: 8, opset_import: ["" : 17]>
qkv (float[N, 8] x) => (float[N, 8] q, float[N, 8] k, float[N, 8] v, float[N, 8] res) {
  [q_proj] q = MatMul(x, wq)
  [k_proj] k = MatMul(x, wk)
  [v_proj] v = MatMul(x, wv)
  [residual] res = Add(x, v)
}
"""


def qkv(rng: np.random.Generator) -> ir.Model:
    """Three MatMuls (q_proj, k_proj, v_proj) sharing input x, which a residual Add also reads."""
    return build(QKV, {name: weights(rng, 8, 8) for name in ("wq", "wk", "wv")})


RELU_ONLY = """
<ir_version: 8, opset_import: ["" : 17]>
relu_only (float[N, 4] x) => (float[N, 4] y) {
  y = Relu(x)
}
"""


def relu_only() -> ir.Model:
    """A model with nothing to quantize."""
    return build(RELU_ONLY)


def feeds(
    rng: np.random.Generator, batches: int, rows: int, features: int, name: str = "x"
) -> list[dict[str, np.ndarray]]:
    """``batches`` float32 Gaussian feeds of shape (rows, features) for one input."""
    return [{name: rng.standard_normal((rows, features)).astype(np.float32)} for _ in range(batches)]
