"""DropSoftmaxNanGuardPass: the exporter's Where(IsNaN(softmax)) goes where the added mask is finite, exactly."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from builders import build, ops, run

from graphquant.lowering import TARGETS
from graphquant.lowering.softmax_nan_guard import DropSoftmaxNanGuardPass

MASKED_ATTENTION = """
<ir_version: 8, opset_import: ["" : 18]>
masked_attention (float[B, H, T, 4] q, float[B, H, 4, T] kt, float[B, H, T, 4] v, bool[B, 1, 1, T] keep)
    => (float[B, H, T, 4] y) {
  mask = Where(keep, zero, blocked)
  s = MatMul(q, kt)
  masked = Add(s, mask)
  p = Softmax<axis = -1>(masked)
  nan = IsNaN(p)
  guarded = Where(nan, zero, p)
  y = MatMul(guarded, v)
}
"""


def masked_attention(blocked: float) -> ir.Model:
    """SDPA as the torch exporter writes it, with ``blocked`` added at the masked keys."""
    return build(MASKED_ATTENTION, {"zero": np.float32(0.0), "blocked": np.float32(blocked)})


def attention_feeds() -> list[dict[str, np.ndarray]]:
    """Random q, k, v; the key mask blanks every key of the second sequence and a few of the others."""
    rng = np.random.default_rng(12)
    feeds = []
    for _ in range(3):
        keep = rng.random((3, 1, 1, 6)) > 0.3
        keep[0, ..., 0] = True
        keep[1] = False  # a fully masked sequence
        feeds.append(
            {
                "q": rng.standard_normal((3, 2, 6, 4)).astype(np.float32),
                "kt": rng.standard_normal((3, 2, 4, 6)).astype(np.float32),
                "v": rng.standard_normal((3, 2, 6, 4)).astype(np.float32),
                "keep": keep,
            }
        )
    return feeds


def test_a_finite_mask_makes_the_guard_redundant_and_outputs_are_bit_identical():
    model = masked_attention(float(np.finfo(np.float32).min))
    reference = model.clone()
    assert DropSoftmaxNanGuardPass()(model).modified
    assert ops(model) == ["Where", "MatMul", "Add", "Softmax", "MatMul"]  # the mask's Where stays
    (context,) = [node for node in model.graph if node.outputs[0].name == "y"]
    assert context.inputs[0].producer().op_type == "Softmax"
    for feed in attention_feeds():
        (expected,), (got,) = run(reference, feed), run(model, feed)
        np.testing.assert_array_equal(expected, got)
        assert np.isfinite(got).all()


def test_a_mask_of_minus_infinity_keeps_the_guard_that_zeroes_blank_rows():
    model = masked_attention(-np.inf)
    assert not DropSoftmaxNanGuardPass()(model).modified
    (got,) = run(model, attention_feeds()[0])
    np.testing.assert_array_equal(got[1], 0.0)  # the fully masked sequence: NaN rows the guard turns to 0


def test_the_ort_cpu_target_drops_the_guard():
    assert DropSoftmaxNanGuardPass in TARGETS["ort-cpu"]
