"""channel_reductions: per-channel (axis 1) max, min and mean of NCHW tensors over calibration batches."""

from __future__ import annotations

import numpy as np
import pytest

from builders import build, run, weights
from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.channel_probe import channel_reductions

F32 = np.float32

CONV = """
<ir_version: 8, opset_import: ["" : OPSET]>
conv (float[N, 3, 6, 6] x) => (float[N, 5, 6, 6] y) {
  [conv] c = Conv<pads: ints = [1, 1, 1, 1], kernel_shape: ints = [3, 3]>(x, w)
  y = Relu(c)
}
"""


@pytest.mark.parametrize("opset", [17, 18])  # axes as an attribute, then as an input
def test_reductions_match_numpy_over_all_batches(opset):
    model = build(CONV.replace("OPSET", str(opset)), {"w": weights(np.random.default_rng(0), 5, 3, 3, 3)})
    rng = np.random.default_rng(1)
    data = [{"x": rng.standard_normal((4, 3, 6, 6)).astype(F32)} for _ in range(3)]
    conv_only = build(
        CONV.replace("OPSET", str(opset)).replace("y = Relu(c)", "y = Identity(c)"),
        {"w": model.graph.initializers["w"].const_value.numpy()},
    )
    values = np.concatenate([run(conv_only, feed)[0] for feed in data])
    calibrator = Calibrator.for_model(model, data, show_progress=False)

    found = channel_reductions(calibrator, model, {"c": 4}, ("ReduceMax", "ReduceMin", "ReduceMean"))["c"]

    np.testing.assert_allclose(found["ReduceMax"], values.max(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(found["ReduceMin"], values.min(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(found["ReduceMean"], values.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert [node.op_type for node in model.graph] == ["Conv", "Relu"]  # the probe ran on a copy


def test_unknown_reductions_are_refused():
    model = build(CONV.replace("OPSET", "17"), {"w": weights(np.random.default_rng(0), 5, 3, 3, 3)})
    calibrator = Calibrator.for_model(model, [{"x": np.zeros((1, 3, 6, 6), F32)}], show_progress=False)
    with pytest.raises(ValueError, match="ReduceSum"):
        channel_reductions(calibrator, model, {"c": 4}, ("ReduceSum",))
