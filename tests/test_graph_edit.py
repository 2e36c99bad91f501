"""Graph-editing helpers: dropping an unused initializer also unmaps its memory-mapped pages."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from builders import mlp

from graphquant.analysis.runner import open_session
from graphquant.graph_edit import remove_if_unused


def test_a_dropped_mapped_initializer_is_unmapped_and_the_model_still_runs(tmp_path):
    path = tmp_path / "model.onnx"
    ir.save(mlp(np.random.default_rng(0)), path, external_data="model.onnx.data", size_threshold_bytes=0)
    model = ir.load(path)
    w1 = model.graph.initializers["w1"]
    original = np.array(w1.const_value.numpy())  # maps the file
    assert w1.const_value.raw is not None
    replacement = ir.Value(name="w1_new", const_value=ir.tensor(original * 2, name="w1_new"))
    model.graph.register_initializer(replacement)
    w1.consumers()[0].replace_input_with(1, replacement)
    assert remove_if_unused(model.graph, w1)
    assert w1.const_value.raw is None  # its mapping is closed; a later read maps it again
    np.testing.assert_array_equal(w1.const_value.numpy(), original)
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    with open_session(model) as session:
        got = session.run(None, {"x": x})[0]
    w2, b1, b2 = (model.graph.initializers[name].const_value.numpy() for name in ("w2", "b1", "b2"))
    want = np.maximum(x @ (original * 2) + b1, 0.0) @ w2.T + b2
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
