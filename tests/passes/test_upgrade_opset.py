"""UpgradeOpsetPass: models below opset 13 are converted (exactly); newer ones are left alone."""

from __future__ import annotations

import numpy as np
from builders import assert_same_outputs, build, gaussian_feeds, weights

from graphquant.passes import UpgradeOpsetPass

OPSET_11 = """
<ir_version: 7, opset_import: ["" : 11]>
old (float[N, 16] x) => (float[N, 8] y) {
  h = MatMul(x, w)
  s = Unsqueeze<axes: ints = [0]>(h)
  y = Squeeze<axes: ints = [0]>(s)
}
"""


def test_opset_11_model_is_upgraded_to_13_with_the_same_outputs():
    model = build(OPSET_11, {"w": weights(np.random.default_rng(0), 16, 8)})
    reference = model.clone()
    assert UpgradeOpsetPass()(model).modified
    assert model.graph.opset_imports[""] == 13
    assert_same_outputs(reference, model, gaussian_feeds(seed=900, batches=2))


def test_a_model_at_or_above_the_floor_is_not_modified():
    model = build(OPSET_11, {"w": weights(np.random.default_rng(1), 16, 8)})
    assert not UpgradeOpsetPass(minimum=11)(model).modified
    assert model.graph.opset_imports[""] == 11
