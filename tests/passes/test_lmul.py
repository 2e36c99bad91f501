"""LMulPass: MatMul/Gemm computed with L-Mul products in onnxruntime, bit-exact against the numpy reference."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from builders import build, gaussian_feeds, run, weights

import graphquant
from graphquant.analysis.lmul import FORMATS, exact_matmul, lmul, lmul_matmul
from graphquant.passes.lmul import LMulPass

ONE_LAYER = """
<ir_version: 11, opset_import: ["" : 26]>
one (float[N, {k}] x) => (float[N, {n}] y) {{
  [fc] y = MatMul(x, w)
}}
"""

LAYERS = """
<ir_version: 11, opset_import: ["" : 26]>
layers (float[2, 3, 16] x, float[2, 16, 8] xt) => (float[2, 3, 5] y, float[2, 3, 8] s) {
  [fc] f = MatMul(x, w)
  [gemm_in] flat = Reshape(f, shape)
  [gemm] g = Gemm<transB: int = 1, alpha: float = 0.5, beta: float = 2.0>(flat, wt, c)
  [back] y = Reshape(g, out_shape)
  [scores] s = MatMul(x, xt)
}
"""


def edge_values(name: str) -> np.ndarray:
    """Zeros, infinities, NaN, the format's extremes, values beyond them, tiny and random values."""
    fmt = FORMATS[name]
    rng = np.random.default_rng(5)
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, fmt.max_finite, -fmt.max_finite, fmt.max_finite * 4]
    small = [fmt.min_normal, -fmt.min_step, fmt.min_step * 0.4, fmt.min_step * 0.6, fmt.min_normal * 0.99]
    big = float(np.finfo(np.float32).max)
    values = np.array(special + small + [big, -big, 1.0, 1.9375, -1.5], np.float64)
    return np.concatenate([np.clip(values, -big, big), rng.standard_normal(12) * 4]).astype(np.float32)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_product_is_bit_exact_on_edge_cases(name: str) -> None:
    values = edge_values(name)
    model = build(ONE_LAYER.format(k=1, n=values.size), {"w": values[None, :]})
    assert LMulPass(format=name, scaled=False)(model).modified
    (got,) = run(model, {"x": values[:, None]})
    expected = lmul(values[:, None], values[None, :], FORMATS[name])
    # +0 and -0 sums differ only by the sign of an exact zero, which ReduceSum may not keep: compare those apart.
    zero = expected == 0
    np.testing.assert_array_equal(got[~zero].view(np.uint32), expected[~zero].view(np.uint32))
    assert np.all(got[zero] == 0)


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("product", ["lmul", "exact"])
def test_matmul_matches_the_reference_dot_products(name: str, product: str) -> None:
    rng = np.random.default_rng(6)
    w = weights(rng, 24, 10, scale=0.05)
    x = (rng.standard_normal((37, 24)) * np.exp2(rng.integers(-3, 4, 24))).astype(np.float32)
    model = build(ONE_LAYER.format(k=24, n=10), {"w": w})
    # 3 rows per chunk: 37 rows need padding of the last chunk.
    assert LMulPass(format=name, product=product, chunk_elements=24 * 10 * 3)(model).modified
    (got,) = run(model, {"x": x})
    fmt = FORMATS[name]
    expected = lmul_matmul(x, w, fmt) if product == "lmul" else exact_matmul(x, w, fmt)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * np.abs(expected).max())
    assert np.abs(expected - x @ w).max() > 1e-3 * np.abs(expected).max()  # the error studied is really there


def test_gemm_and_batched_matmul_are_rewritten_attention_matmuls_are_not() -> None:
    rng = np.random.default_rng(7)
    arrays = {"w": weights(rng, 16, 8), "wt": weights(rng, 5, 8), "c": weights(rng, 5)}
    shapes = {"shape": np.array([-1, 8], np.int64), "out_shape": np.array([2, 3, 5], np.int64)}
    model = build(LAYERS, {**arrays, **shapes})
    assert LMulPass(format="e4m3", chunk_elements=50)(model).modified
    assert sorted(n.op_type for n in model.graph if n.op_type in ("MatMul", "Gemm", "Scan")) == [
        "MatMul",
        "Scan",
        "Scan",
    ]
    x = rng.standard_normal((2, 3, 16)).astype(np.float32)
    xt = rng.standard_normal((2, 16, 8)).astype(np.float32)
    y, s = run(model, {"x": x, "xt": xt})
    fmt = FORMATS["e4m3"]
    hidden = lmul_matmul(x, arrays["w"], fmt).astype(np.float32).reshape(-1, 8)
    expected = 0.5 * lmul_matmul(hidden, arrays["wt"].T, fmt) + 2.0 * arrays["c"]
    np.testing.assert_allclose(y, expected.reshape(2, 3, 5), rtol=0, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(s, x @ xt, rtol=1e-5, atol=1e-5)


SCORES_ONLY = """
<ir_version: 11, opset_import: ["" : 26]>
scores (float[4, 8] q, float[8, 4] k) => (float[4, 4] s) {
  [scores] s = MatMul(q, k)
}
"""


def test_a_graph_without_weight_layers_is_not_modified() -> None:
    model = build(SCORES_ONLY)
    assert not LMulPass()(model).modified


def test_an_opset_without_bitcast_is_refused() -> None:
    model = build(
        ONE_LAYER.format(k=4, n=2).replace('"" : 26', '"" : 21').replace("11", "10"), {"w": np.ones((4, 2), np.float32)}
    )
    with pytest.raises(ir.passes.PreconditionError, match="opset >= 26"):
        LMulPass()(model)


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="format"):
        LMulPass(format="e3m4")
    with pytest.raises(ValueError, match="product"):
        LMulPass(product="approximate")


MLP_17 = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[N, 16] x) => (float[N, 4] y) {
  h = MatMul(x, w1)
  r = Relu(h)
  y = Gemm<transB: int = 1>(r, w2, b2)
}
"""


@pytest.mark.parametrize("recipe,options", [("lmul-e4m3", {}), ("lmul-e4m3", {"format": "e4m4"}), ("fp8-e4m3", {})])
def test_the_presets_upgrade_the_opset_and_compute_the_reference(recipe: str, options: dict[str, str]) -> None:
    rng = np.random.default_rng(8)
    arrays = {"w1": weights(rng, 16, 12), "w2": weights(rng, 4, 12), "b2": weights(rng, 4)}
    feeds = gaussian_feeds(9, batches=2, rows=20)
    result = graphquant.optimize(build(MLP_17, arrays), recipe, feeds, show_progress=False, **options)
    assert result.model.graph.opset_imports[""] >= 26
    fmt = FORMATS[options.get("format", "e4m3")]
    matmul = exact_matmul if recipe.startswith("fp8") else lmul_matmul
    x = feeds[0]["x"]
    hidden = np.maximum(matmul(x, arrays["w1"], fmt), 0).astype(np.float32)
    expected = matmul(hidden, arrays["w2"].T, fmt) + arrays["b2"]
    (got,) = run(result.model, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert len(result.report.quantized) == 2
    assert all(f"{fmt.name} operands" in layer.scheme for layer in result.report.quantized)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_scaled_float32_sums_stay_finite(name: str) -> None:
    # bf16-like once scaled its operands to 2^63, where the float32 sums of products overflowed.
    rng = np.random.default_rng(10)
    # Positive operands: 1024 products of about 2^122 each would sum past float32's largest finite value.
    x = np.abs(rng.standard_normal((3, 1024))).astype(np.float32)
    w = np.abs(rng.standard_normal((1024, 3))).astype(np.float32)
    model = build(ONE_LAYER.format(k=1024, n=3), {"w": w})
    LMulPass(format=name)(model)
    (got,) = run(model, {"x": x})
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, lmul_matmul(x, w, FORMATS[name]), rtol=0, atol=2e-6 * np.abs(x @ w).max())


SHARED = """
<ir_version: 11, opset_import: ["" : 26]>
shared (float[N, 8] x) => (float[N, 4] y, float[N, 4] z, float[N, 4] a) {
  [first] y = MatMul(x, w)
  [second] z = MatMul(x, w)
  [reader] a = Relu(y)
}
"""


def test_shared_inputs_and_an_output_that_is_also_read() -> None:
    rng = np.random.default_rng(11)
    w = weights(rng, 8, 4)
    model = build(SHARED, {"w": w})
    assert LMulPass(format="e5m2")(model).modified
    assert "w" not in model.graph.initializers and not any(n.op_type == "MatMul" for n in model.graph)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    y, z, a = run(model, {"x": x})
    expected = lmul_matmul(x, w, FORMATS["e5m2"])
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    np.testing.assert_array_equal(y, z)
    np.testing.assert_array_equal(a, np.maximum(y, 0))
    assert [v.name for v in model.graph.outputs] == ["y", "z", "a"]
