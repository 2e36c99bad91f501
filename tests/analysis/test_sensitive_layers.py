"""keep_8bit patterns: node-name globs and the @first / @last / @depthwise roles, through QuantizePass and onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

from builders import build, run, weights
from graphquant.analysis.layers import candidates
from graphquant.analysis.sensitive_layers import matching_layers
from graphquant.lowering.qdq import QdqLoweringPass
from graphquant.passes.quantize import NodeOverride, QuantizePass

CNN = """
<ir_version: 8, opset_import: ["" : 17]>
cnn (float[N, 3, 8, 8] x) => (float[N, 5] y) {
  [stem] a = Conv<kernel_shape: ints = [3, 3], pads: ints = [1, 1, 1, 1]>(x, w_stem)
  [dw] b = Conv<kernel_shape: ints = [3, 3], pads: ints = [1, 1, 1, 1], group: int = 8>(a, w_dw)
  [pw] c = Conv<kernel_shape: ints = [1, 1]>(b, w_pw)
  [one] d = Conv<kernel_shape: ints = [1, 1], group: int = 16>(c, w_one)
  p = GlobalAveragePool(d)
  f = Flatten(p)
  [head] y = Gemm<transB: int = 1>(f, w_head)
}
"""


def cnn():
    rng = np.random.default_rng(0)
    shapes = {"w_stem": (8, 3, 3, 3), "w_dw": (8, 1, 3, 3), "w_pw": (16, 8, 1, 1), "w_one": (16, 1, 1, 1)}
    return build(CNN, {**{n: weights(rng, *s) for n, s in shapes.items()}, "w_head": weights(rng, 5, 16)})


def layers(model):
    return [c.layer for c in candidates(model.graph) if c.layer is not None]


@pytest.mark.parametrize(
    ("patterns", "names"),
    [
        (("@first",), {"stem"}),
        (("@last",), {"head"}),
        (("@depthwise",), {"dw", "one"}),
        (("p*", "@last"), {"pw", "head"}),
        ((), set()),
    ],
)
def test_patterns_select_layers_by_name_and_role(patterns, names):
    model = cnn()
    assert {node.name for node in matching_layers(layers(model), patterns)} == names


@pytest.mark.parametrize(("patterns", "error"), [(("@stem",), ValueError), ((3,), TypeError), ("@first", TypeError)])
def test_unknown_roles_and_non_strings_are_refused(patterns, error):
    with pytest.raises(error, match="keep_8bit"):
        QuantizePass(wbits=4, abits=0, keep_8bit=patterns)


def test_kept_layers_get_8_bit_weights_after_the_overrides_and_a_smaller_error_in_onnxruntime():
    reference = cnn()
    x = {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    errors, schemes = [], []
    for kept in ((), ("@first", "@depthwise", "@last")):
        model = reference.clone()
        overrides = [NodeOverride("*", {"wbits": 3})]
        QuantizePass(wbits=4, abits=0, overrides=overrides, keep_8bit=kept)(model)
        schemes.append({n.name: n.meta["graphquant.decision"].scheme.split()[0] for n in model.graph if n.name})
        QdqLoweringPass()(model)
        errors.append(float(np.sum((run(reference, x)[0] - run(model, x)[0]) ** 2)))
    assert set(schemes[0].values()) == {"W3"}
    assert schemes[1] == {"stem": "W8", "dw": "W8", "pw": "W3", "one": "W8", "head": "W8"}
    assert errors[1] < 0.5 * errors[0]
