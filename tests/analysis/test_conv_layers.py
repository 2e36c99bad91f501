"""Conv, depthwise/grouped Conv and ConvTranspose as layers: weight axes, per-tensor fallback, no scale migration."""

from __future__ import annotations

import numpy as np
import pytest

from builders import build, by_name, weights
from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.layers import classify, migratable_groups
from graphquant.passes.preexecute_dequant import PreexecuteDequantPass
from graphquant.passes.symmetrize import SymmetrizePass

CONVS = """
<ir_version: 8, opset_import: ["" : 17]>
convs (float[N, 4, 6, 6] x) => (float[N, 4, 6, 6] a, float[N, 8, 6, 6] b, float[N, 6, 12, 12] c, float[N, 6, 12, 12] d)
{
  [depthwise] a = Conv<group: int = 4, pads: ints = [1, 1, 1, 1], kernel_shape: ints = [3, 3]>(x, wa)
  [grouped] b = Conv<group: int = 2, kernel_shape: ints = [1, 1]>(x, wb)
  [up] c = ConvTranspose<strides: ints = [2, 2], kernel_shape: ints = [2, 2]>(x, wc)
  [up_grouped] d = ConvTranspose<group: int = 2, strides: ints = [2, 2], kernel_shape: ints = [2, 2]>(x, wd)
}
"""


def convs():
    rng = np.random.default_rng(0)
    return build(
        CONVS,
        {
            "wa": weights(rng, 4, 1, 3, 3),
            "wb": weights(rng, 8, 2, 1, 1),
            "wc": weights(rng, 4, 6, 2, 2),
            "wd": weights(rng, 4, 3, 2, 2),
        },
    )


@pytest.mark.parametrize(
    ("name", "out_axis", "in_axis"),
    [("depthwise", 0, 1), ("grouped", 0, 1), ("up", 1, 0), ("up_grouped", None, 0)],
)
def test_conv_weight_axes(name, out_axis, in_axis):
    layer = classify(by_name(convs())[name]).layer
    assert layer is not None
    assert (layer.activation_index, layer.weight_index) == (0, 1)
    assert layer.out_axis == out_axis and layer.in_axis == in_axis


def test_convs_form_no_migratable_group_and_the_migrating_passes_leave_them_alone():
    model = convs()
    assert migratable_groups(model.graph) == []
    data = [{"x": np.random.default_rng(1).standard_normal((2, 4, 6, 6)).astype(np.float32) + 3.0}]
    for make in (SymmetrizePass, PreexecuteDequantPass):
        assert not make(Calibrator.for_model(model, data, show_progress=False))(model).modified
