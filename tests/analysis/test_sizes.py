"""Per-layer stored bytes, through DequantizeLinear chains and packed 4-bit types."""

from __future__ import annotations

import numpy as np

from builders import build
from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.sizes import layer_bytes
from graphquant.lowering.qdq import QdqLoweringPass
from graphquant.passes.quantize import QuantizePass

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
two (float[N, 64] x) => (float[N, 32] y) {
  [fc1] h = MatMul(x, w1)
  [fc1_bias] hb = Add(h, b1)
  [fc2] y = Gemm<transB: int = 1>(hb, w2)
}
"""


def test_layer_bytes_follow_dequantize_chains_and_count_packed_int4():
    rng = np.random.default_rng(0)
    arrays = {"w1": rng.standard_normal((64, 48)), "b1": rng.standard_normal(48), "w2": rng.standard_normal((32, 48))}
    model = build(TEXT, {name: array.astype(np.float32) for name, array in arrays.items()})
    layers = {"fc1", "fc2", "fc1_bias"}
    assert layer_bytes(model, layers) == {"fc1": 64 * 48 * 4, "fc1_bias": 48 * 4, "fc2": 32 * 48 * 4}
    data = [{"x": rng.standard_normal((8, 64)).astype(np.float32)}]
    QuantizePass(Calibrator.for_model(model, data, show_progress=False), wbits=4, abits=0, block_size=16)(model)
    QdqLoweringPass()(model)
    after = layer_bytes(model, layers)
    # fc1: 64x48 int4 codes, [4, 48] float scales and int8 zero points stored as INT4 (packed two per byte)
    assert after["fc1"] == 64 * 48 // 2 + 4 * 48 * 4 + 4 * 48 // 2
    assert after["fc2"] == 32 * 48 // 2 + 32 * 3 * 4 + 32 * 3 // 2
    assert after["fc1_bias"] == 48 * 4
