"""The run report's JSON file: written atomically, never over a directory or a device."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from builders import feeds, mlp, mlp_reference

import graphquant
from graphquant.errors import OutputError


@pytest.fixture(scope="module")
def report():
    rng = np.random.default_rng(0)
    model = mlp(rng)
    data = feeds(rng, batches=2, rows=8, features=16)
    result = graphquant.optimize(model, calibration=data, show_progress=False)
    reference = np.concatenate([mlp_reference(model, feed["x"]) for feed in data])
    assert result.report.outputs["y"].cosine > 0.99 and np.abs(reference).max() > 0
    return result.report


def test_save_json_replaces_a_regular_file_atomically(report, tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old\n")
    report.save_json(path)
    assert json.loads(path.read_text()) == json.loads(report.to_json())
    assert json.loads(path.read_text())["outputs"]["y"]["cosine"] == pytest.approx(report.outputs["y"].cosine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


@pytest.mark.usefixtures("device_files")
def test_save_json_refuses_a_directory_or_a_device(report, tmp_path):
    with pytest.raises(OutputError, match="cannot write the report there: it is a directory"):
        report.save_json(tmp_path)
    with pytest.raises(OutputError, match="cannot write the report there: it is a character device"):
        report.save_json("/dev/full")
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    assert list(tmp_path.iterdir()) == []
