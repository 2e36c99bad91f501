"""KV-cache decode graphs (graphquant/analysis/decode.py): calibration feeds, greedy generation, agreement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from graphquant.analysis.data import CalibrationData, InputSpec
from graphquant.analysis.decode import DecodeGraph, agreement, calibration_feeds, generate, save_test_data
from graphquant.errors import CalibrationError, InvalidModelError, OutputError
from graphquant.frontends.onnx_file import load

VOCAB = 128


def windows(count: int, seq: int, seed: int = 0) -> np.ndarray:
    """Random token windows [count, seq]."""
    return np.random.default_rng(seed).integers(0, VOCAB, (count, seq))


def prefill_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    """Logits of the cache-free prefill graph."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]


def test_calibration_feeds_are_decode_steps_with_the_cache_of_the_earlier_positions(tiny_llama_decode):
    graph = DecodeGraph.open(tiny_llama_decode)
    tokens = windows(5, 16)
    feeds = calibration_feeds(graph, tokens, positions=[3, 11], batch_size=4)
    assert len(feeds) == 2 * 3  # two batches (4 + 1 windows), each a prefill feed and two steps
    for start, prefill, *steps in ((0, *feeds[:3]), (4, *feeds[3:])):
        batch = tokens[start : start + 4]
        np.testing.assert_array_equal(prefill["input_ids"], batch)
        assert prefill["past_key_values.0.key"].shape == (len(batch), graph.kv_heads, 0, graph.head_dim)
        for position, feed in zip((3, 11), steps):
            np.testing.assert_array_equal(feed["input_ids"], batch[:, position : position + 1])
            np.testing.assert_array_equal(feed["position_ids"], np.full((len(batch), 1), position))
            assert feed["attention_mask"].shape == (len(batch), position + 1)
            _, cache = graph.step(batch[:, :position], graph.empty_cache(len(batch)))
            for name, expected in zip(graph.past, cache):
                assert feed[name].shape == (len(batch), graph.kv_heads, position, graph.head_dim)
                np.testing.assert_allclose(feed[name], expected, atol=1e-5)


def test_calibration_feeds_pass_graphquants_input_checks(tiny_llama_decode, tmp_path: Path):
    feeds = calibration_feeds(DecodeGraph.open(tiny_llama_decode), windows(2, 8), positions=[5])
    specs = InputSpec.of_model(load(tiny_llama_decode))
    assert [sorted(feed) for feed in CalibrationData(feeds, specs)] == [sorted(feed) for feed in feeds]
    read = list(CalibrationData(save_test_data(feeds, tmp_path / "calib"), specs))
    with pytest.raises(OutputError, match="calib: already holds test_data_set_"):
        save_test_data(feeds, tmp_path / "calib")
    assert len(read) == len(feeds)
    for got, want in zip(read, feeds):
        assert sorted(got) == sorted(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


@pytest.mark.parametrize("positions", [[0], [8], []])
def test_calibration_positions_outside_the_window_are_refused(tiny_llama_decode, positions):
    with pytest.raises(CalibrationError, match="decode positions must lie in 1..7"):
        calibration_feeds(DecodeGraph.open(tiny_llama_decode), windows(2, 8), positions)


def test_token_windows_must_be_an_integer_matrix(tiny_llama_decode):
    with pytest.raises(CalibrationError, match=r"integer array \[windows, seq\], got float64 \(2, 8\)"):
        calibration_feeds(DecodeGraph.open(tiny_llama_decode), windows(2, 8).astype(np.float64), [3])


def test_a_graph_without_a_cache_is_refused_by_name(tiny_llama):
    with pytest.raises(InvalidModelError, match=rf"{tiny_llama}: not a KV-cache decode graph: it has no past_key"):
        DecodeGraph.open(tiny_llama)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_greedy_generation_follows_the_prefill_graphs_argmax(llama_exports, exporter):
    prompts = windows(2, 6, seed=1)
    generation = generate(DecodeGraph.open(llama_exports("decode", exporter)), prompts, steps=5)
    sequence = prompts
    for step in range(5):
        sequence = np.concatenate(
            [sequence, prefill_logits(llama_exports("prefill", exporter), sequence)[:, -1:].argmax(-1)], axis=1
        )
    np.testing.assert_array_equal(generation.tokens, sequence[:, 6:])
    assert len(generation.step_seconds) == 2 * 4


def test_agreement_counts_whole_matches_and_matched_prefixes():
    reference = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8]])
    candidate = np.array([[1, 2, 3, 4], [1, 9, 3, 4], [0, 6, 7, 8]])
    result = agreement(reference, candidate)
    assert result.all_match == pytest.approx(1 / 3)
    assert result.mean_prefix == pytest.approx((4 + 1 + 0) / 3)
    with pytest.raises(ValueError, match="differ in shape"):
        agreement(reference, candidate[:, :2])
