"""Embedding quantization: the specs it chooses, and both lowerings (DQ -> Gather, GatherBlockQuantized) in ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from builders import build, run
from graphquant.lowering.gather_block_quantized import GatherBlockQuantizedLoweringPass
from graphquant.lowering.qdq import QdqLoweringPass
from graphquant.passes.quantize_embeddings import QuantizeEmbeddingsPass
from graphquant.quant_spec import DECISION_KEY, INPUT_SPECS_KEY

F32 = np.float32

EMBEDDINGS = """
<ir_version: 8, opset_import: ["" : 17]>
embeddings (int64[B, S] ids, int64[B, S] types) => (float[B, S, 96] y) {
  [word] w = Gather(table, ids)
  [token_type] t = Gather(types_table, types)
  y = Add(w, t)
}
"""


def embedding_model(rng: np.random.Generator) -> ir.Model:
    """A 200 x 96 word table (hidden not a multiple of 64) and a 2-row token-type table."""
    return build(
        EMBEDDINGS,
        {"table": rng.standard_normal((200, 96)).astype(F32), "types_table": rng.standard_normal((2, 96)).astype(F32)},
    )


def feeds(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"ids": rng.integers(0, 200, (3, 7)), "types": rng.integers(0, 2, (3, 7))}


# (bits, block size option, expected axis, block size and scale shape, scheme)
CASES = [
    (8, None, (0, None, (200,)), "embedding W8 per-row clip-searched"),
    (8, 64, (1, 64, (200, 2)), "embedding W8 block 64 clip-searched"),
    (4, None, (1, 64, (200, 2)), "embedding W4 block 64 clip-searched"),
    (4, 32, (1, 32, (200, 3)), "embedding W4 block 32 clip-searched"),
]


@pytest.mark.parametrize(("bits", "block", "layout", "scheme"), CASES)
def test_both_lowerings_give_the_dequantized_rows(bits, block, layout, scheme):
    rng = np.random.default_rng(0)
    reference = embedding_model(rng)
    model = reference.clone()
    result = QuantizeEmbeddingsPass(embed_bits=bits, embed_block_size=block)(model)
    assert result.modified
    word, token_type = model.graph.node("word"), model.graph.node("token_type")
    assert INPUT_SPECS_KEY not in token_type.meta  # two rows: not worth their scales
    spec = word.meta[INPUT_SPECS_KEY][0]
    assert (spec.bits, (spec.axis, spec.block_size, spec.scale.shape)) == (bits, layout)
    assert word.meta[DECISION_KEY].scheme == scheme
    table = reference.graph.initializers["table"].const_value.numpy()
    dequantized = spec.dequantize(spec.quantize(table))
    relative_error = np.linalg.norm(dequantized - table) / np.linalg.norm(table)
    assert relative_error < (0.01 if bits == 8 else 0.12)

    qdq, gathered = model.clone(), model.clone()  # annotations included
    QdqLoweringPass()(qdq)
    GatherBlockQuantizedLoweringPass()(gathered)
    assert [n.op_type for n in qdq.graph] == ["DequantizeLinear", "Gather", "Gather", "Add"]
    assert [n.op_type for n in gathered.graph] == ["GatherBlockQuantized", "Gather", "Add"]
    for lowered in (qdq, gathered):
        onnx.checker.check_model(ir.to_proto(lowered))
    feed = feeds(rng)
    types_table = reference.graph.initializers["types_table"].const_value.numpy()
    expected = dequantized[feed["ids"]] + types_table[feed["types"]]
    for lowered in (qdq, gathered):
        np.testing.assert_allclose(run(lowered, feed)[0], expected, rtol=1e-6, atol=1e-6)
    stored = gathered.graph.node("word").inputs[0].const_value
    assert stored.numpy().nbytes == 200 * 96 * bits // 8  # 4-bit codes packed two per byte


def test_gathers_of_computed_tables_or_other_axes_are_left_alone():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    other (float[100, 96] live, int64[4] ids) => (float[4, 96] a, float[100, 4] b) {
      a = Gather(live, ids)
      b = Gather<axis: int = 1>(table, ids)
    }
    """
    model = build(text, {"table": np.ones((100, 96), F32)})
    assert not QuantizeEmbeddingsPass()(model).modified


@pytest.mark.parametrize("options", [{"embed_bits": 1}, {"embed_bits": 9}, {"embed_block_size": 0}])
def test_bad_options_are_refused(options):
    with pytest.raises(ValueError, match="embed_"):
        QuantizeEmbeddingsPass(**options)
