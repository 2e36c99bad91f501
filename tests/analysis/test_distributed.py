"""Calibration on a local Ray cluster of 2 workers: the same statistics and the same quantized bytes as one process."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import sys
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir
import pytest
from builders import ln_qkv, mlp, outlier_feeds, save_model

import graphquant
from graphquant.analysis import distributed
from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.distributed import RayCluster, connect
from graphquant.analysis.stats import TensorStats
from graphquant.cli import main
from graphquant.errors import CalibrationError

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local two-CPU Ray cluster for the module (localhost only, no dashboard)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def cluster(local_ray):
    """Two calibration workers (their CPUs free again when the test ends and drops them)."""
    return RayCluster(2)


def odd_feeds(batches: int = 5) -> list[dict[str, np.ndarray]]:
    """Outlier feeds of unequal row counts, so the workers' shares and the row samples differ per batch."""
    return [{"x": feed["x"][: 24 + 9 * i]} for i, feed in enumerate(outlier_feeds(3, batches))]


def assert_identical(expected: TensorStats, got: TensorStats) -> None:
    """Every field equal to the bit (arrays) or exactly (counts)."""
    for field in dataclasses.fields(TensorStats):
        want, have = getattr(expected, field.name), getattr(got, field.name)
        if isinstance(want, np.ndarray) or isinstance(have, np.ndarray):
            assert want is not None and have is not None, field.name
            assert want.dtype == have.dtype and np.array_equal(want, have), field.name
        else:
            assert want == have, field.name


def test_statistics_equal_the_single_process_ones_to_the_bit(cluster):
    model = ln_qkv(np.random.default_rng(0))
    names = [value.name for node in model.graph for value in node.outputs] + ["x"]
    data = odd_feeds()
    options = {"sample_rows": 40, "gram_names": ["x", "h"]}
    alone = Calibrator.for_model(model, data, False).collect(model, names, **options)
    spread = Calibrator.for_model(model, data, False, cluster).collect(model, names, **options)
    assert spread.batches == alone.batches == 5
    assert list(spread.tensors) == list(alone.tensors) and len(alone.tensors) > 4
    for name, stats in alone.tensors.items():
        assert_identical(stats, spread[name])
    assert alone["h"].gram is not None and alone["x"].sample.shape == (40, 16)  # the merges did subsample


def test_a_memory_mapped_model_runs_on_the_workers_as_it_does_here(cluster, tmp_path):
    path = save_model(ln_qkv(np.random.default_rng(1)), tmp_path / "model.onnx")
    model = graphquant.load(path)
    names = [value.name for node in model.graph for value in node.outputs]
    alone = Calibrator.for_model(model, odd_feeds(), False).collect(model, names)
    spread = Calibrator.for_model(model, odd_feeds(), False, cluster).collect(model, names)
    for name, stats in alone.tensors.items():
        assert_identical(stats, spread[name])


@pytest.mark.parametrize("recipe", ["w8a8", "outliertune"])
def test_the_quantized_model_is_byte_identical(recipe):
    model = ln_qkv(np.random.default_rng(2))
    alone = graphquant.optimize(model, recipe, odd_feeds(), show_progress=False)
    spread = graphquant.optimize(model, recipe, odd_feeds(), show_progress=False, workers=2)
    assert alone.report.quantized
    assert ir.to_proto(spread.model).SerializeToString() == ir.to_proto(alone.model).SerializeToString()


def test_the_cli_quantizes_on_workers(tmp_path, capsys):
    rng = np.random.default_rng(0)
    model_path = save_model(mlp(rng), tmp_path / "model.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((40, 16)).astype(np.float32))
    outputs = {}
    for label, extra in (("alone", []), ("spread", ["--workers", "2"])):
        outputs[label] = tmp_path / f"{label}.onnx"
        argv = ["optimize", str(model_path), "-o", str(outputs[label]), "--recipe", "w8a8", "--calib", str(calib)]
        assert main(argv + extra) == 0
    assert outputs["alone"].read_bytes() == outputs["spread"].read_bytes()
    assert "QuantizeLinear" in outputs["spread"].read_bytes().decode("latin-1")


def cli_error(tmp_path, capsys, *extra: str) -> str:
    """The one error line of an optimize run given the extra options (its exit code checked to be 1)."""
    rng = np.random.default_rng(0)
    model_path = save_model(mlp(rng), tmp_path / "model.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((16, 16)).astype(np.float32))
    argv = ["optimize", str(model_path), "-o", str(tmp_path / "out.onnx"), "--recipe", "w8a8", "--calib", str(calib)]
    assert main(argv + list(extra)) == 1
    assert not (tmp_path / "out.onnx").exists()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1
    return lines[0]


@contextlib.contextmanager
def socket_closed_port() -> Iterator[int]:
    """A localhost port that was free a moment ago and has nothing listening on it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield port


def test_an_address_with_no_cluster_is_refused_in_one_line(tmp_path, capsys):
    with socket_closed_port() as port:
        line = cli_error(tmp_path, capsys, "--ray", f"127.0.0.1:{port}")
    assert f"--ray 127.0.0.1:{port}: no Ray cluster answers there" in line


def test_a_malformed_address_is_refused(tmp_path, capsys):
    assert "--ray nowhere: expected HOST:PORT" in cli_error(tmp_path, capsys, "--ray", "nowhere")


def test_more_workers_than_cluster_cpus_are_refused(tmp_path, capsys):
    assert "--workers 3: the Ray cluster has 2 CPUs" in cli_error(tmp_path, capsys, "--workers", "3")
    assert "--workers must be at least 1, got 0" in cli_error(tmp_path, capsys, "--workers", "0")


def test_without_ray_installed_the_error_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where the package is absent
    line = cli_error(tmp_path, capsys, "--workers", "2")
    assert "need Ray, which is not installed (pip install 'graphquant[ray]')" in line
    with pytest.raises(CalibrationError, match="not installed"):
        connect(None, 2)


def test_workers_that_cannot_start_are_refused_not_waited_for(cluster, monkeypatch):
    model = mlp(np.random.default_rng(0))
    data = [{"x": np.ones((4, 16), np.float32)}]
    Calibrator.for_model(model, data, False, cluster).collect(model, ["x"])  # its two workers now hold both CPUs
    monkeypatch.setattr(distributed, "START_TIMEOUT_S", 2.0)
    with pytest.raises(CalibrationError, match="did not start within 2 s"):
        Calibrator.for_model(model, data, False, RayCluster(1)).collect(model, ["x"])


def test_workers_without_calibration_data_are_refused():
    with pytest.raises(CalibrationError, match="give calibration data"):
        graphquant.optimize(mlp(np.random.default_rng(0)), "weight-only", workers=2)
