"""The cnn-w8a8 preset end to end on a mobile-style block: every target runs, and it beats plain w8a8."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import graphquant
from builders import build, ops, run, weights

F32 = np.float32
TARGETS = ("qdq", "ort-cpu", "qoperator")

# stem conv -> ReLU6 -> depthwise -> ReLU6 -> pointwise -> pool -> fc, as in MobileNet / EfficientNet-Lite.
MOBILE = """
<ir_version: 8, opset_import: ["" : 17]>
mobile (float[N, 3, 16, 16] x) => (float[N, 10] y) {
  [stem] s = Conv<strides: ints = [2, 2], pads: ints = [1, 1, 1, 1], kernel_shape: ints = [3, 3]>(x, ws, bs)
  [stem_relu6] sr = Clip(s, zero, six)
  [depthwise] d = Conv<group: int = 16, pads: ints = [1, 1, 1, 1], kernel_shape: ints = [3, 3]>(sr, wd, bd)
  [depthwise_relu6] dr = Clip(d, zero, six)
  [pointwise] p = Conv<kernel_shape: ints = [1, 1]>(dr, wp, bp)
  [pool] g = GlobalAveragePool(p)
  f = Flatten(g)
  [fc] y = Gemm<transB: int = 1>(f, wf, bf)
}
"""


def mobile(rng: np.random.Generator) -> ir.Model:
    """The block with stem channels 100x apart in scale: per-tensor activation grids waste most codes on a few."""
    spread = np.logspace(-1, 1, 16).astype(F32)
    init = {
        "ws": weights(rng, 16, 3, 3, 3) * spread[:, None, None, None],
        "bs": weights(rng, 16, scale=0.1) * spread,
        "wd": weights(rng, 16, 1, 3, 3),
        "bd": weights(rng, 16, scale=0.1),
        "wp": weights(rng, 24, 16, 1, 1),
        "bp": weights(rng, 24, scale=0.1),
        "wf": weights(rng, 10, 24),
        "bf": weights(rng, 10, scale=0.1),
        "zero": F32(0),
        "six": F32(6),
    }
    return build(MOBILE, init)


def images(seed: int, batches: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal((8, 3, 16, 16)) + 0.5).astype(F32)} for _ in range(batches)]


CALIB, HELD_OUT = images(0, 4), images(1, 3)


def mean_squared_error(model: ir.Model, candidate: ir.Model) -> float:
    expected = np.concatenate([run(model, feed)[0] for feed in HELD_OUT])
    got = np.concatenate([run(candidate, feed)[0] for feed in HELD_OUT])
    return float(np.mean((got - expected) ** 2))


@pytest.mark.parametrize("target", TARGETS)
def test_cnn_w8a8_beats_w8a8_on_every_target(target):
    model = mobile(np.random.default_rng(0))
    plain = graphquant.optimize(model, "w8a8", CALIB, target=target, show_progress=False)
    tuned = graphquant.optimize(model, "cnn-w8a8", CALIB, target=target, show_progress=False)
    assert tuned.report.passes == ["equalize-convs", "quantize", "bias-correct"]
    assert {layer.status for layer in tuned.report.layers} == {"quantized"} and len(tuned.report.layers) == 4
    plain_error, tuned_error = mean_squared_error(model, plain.model), mean_squared_error(model, tuned.model)
    assert tuned_error < 0.5 * plain_error, (plain_error, tuned_error)
    # The per-channel ReLU6 bounds stay below no grid top, so the integer targets fuse them like the Clips.
    assert target == "qdq" or not {"Min", "Relu", "Clip"} & set(ops(tuned.model))
