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
