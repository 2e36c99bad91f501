"""The tiny Llama's KV-cache decode graph (examples/smollm2.export_decode): it round-trips against the prefill graph
in onnxruntime, and graphquant's presets quantize its projections, keep the cache float, and keep its greedy tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import graphquant
from graphquant.analysis.decode import DecodeGraph, agreement, calibration_feeds, generate, save_test_data
from graphquant.cli import main

VOCAB = 128
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "MatMulIntegerToFloat", "MatMulNBits", "MatMulInteger"}


def prefill_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    """Logits of the cache-free prefill graph."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_decode_steps_give_the_prefill_logits_at_each_position(llama_exports, exporter):
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 12))
    expected = prefill_logits(llama_exports("prefill", exporter), ids)
    graph = DecodeGraph.open(llama_exports("decode", exporter))
    logits, cache = graph.step(ids[:, :7], graph.empty_cache(2))
    np.testing.assert_allclose(logits, expected[:, :7], atol=1e-5)
    logits, cache = graph.step(ids[:, 7:9], cache)  # a multi-token step after a cache
    np.testing.assert_allclose(logits, expected[:, 7:9], atol=1e-5)
    for position in range(9, 12):
        logits, cache = graph.step(ids[:, position : position + 1], cache)
        np.testing.assert_allclose(logits[:, 0], expected[:, position], atol=1e-5)
    assert all(kv.shape == (2, graph.kv_heads, 12, graph.head_dim) for kv in cache)


# Every preset and target on the dynamo export; two on the legacy export, to keep the suite fast.
PRESET_CASES = [
    *(("dynamo", recipe, target) for recipe in ("w8a8", "outliertune", "weight-only") for target in ("qdq", "ort-cpu")),
    ("legacy", "outliertune", "ort-cpu"),
    ("legacy", "weight-only", "qdq"),
]


@pytest.mark.parametrize(("exporter", "recipe", "target"), PRESET_CASES)
def test_presets_quantize_the_projections_keep_the_cache_float_and_the_greedy_tokens(
    llama_exports, exporter, recipe, target, tmp_path: Path
):
    decode = llama_exports("decode", exporter)
    windows = np.random.default_rng(1).integers(0, VOCAB, (8, 24))
    calibration = calibration_feeds(DecodeGraph.open(decode), windows, positions=[3, 11, 20], batch_size=4)
    result = graphquant.optimize(graphquant.load(decode), recipe, calibration, target=target, show_progress=False)
    path = tmp_path / "decode.q.onnx"
    graphquant.save(result, path)
    model = ir.load(path)
    assert sum(node.op_type in QUANTIZED_OPS for node in model.graph) >= 15  # 7 projections x 2 layers + lm_head
    for value in model.graph.inputs:
        if value.name.startswith("past_key_values."):
            assert {user.op_type for user, _ in value.uses()} <= {"Concat", "Shape"}
    for value in model.graph.outputs:
        assert value.dtype == ir.DataType.FLOAT
    float_graph, quantized = DecodeGraph.open(decode), DecodeGraph.open(path)
    prompts = np.random.default_rng(2).integers(0, VOCAB, (8, 8))
    reference, candidate = generate(float_graph, prompts, 16), generate(quantized, prompts, 16)
    assert agreement(reference.tokens, candidate.tokens).all_match >= 0.75
    step = float_graph.feed(prompts, float_graph.empty_cache(8))
    want, got = float_graph.session.run(["logits"], step)[0], quantized.session.run(["logits"], step)[0]
    cosine = float(np.sum(want * got) / np.linalg.norm(want) / np.linalg.norm(got))
    assert cosine > 0.99


def test_the_cli_quantizes_a_decode_graph_from_a_test_data_folder_of_decode_steps(tiny_llama_decode, tmp_path: Path):
    graph = DecodeGraph.open(tiny_llama_decode)
    windows = np.random.default_rng(3).integers(0, VOCAB, (4, 16))
    folder = save_test_data(calibration_feeds(graph, windows, positions=[5, 12]), tmp_path / "calib")
    out = tmp_path / "decode.q.onnx"
    assert (
        main(["optimize", str(tiny_llama_decode), "-o", str(out), "--calib", str(folder), "--target", "ort-cpu"]) == 0
    )
    step = graph.feed(windows[:, :6], graph.empty_cache(4))
    want, got = graph.session.run(["logits"], step)[0], DecodeGraph.open(out).session.run(["logits"], step)[0]
    assert "MatMulIntegerToFloat" in {node.op_type for node in ir.load(out).graph}
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()
