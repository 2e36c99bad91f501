"""Graph-editing helpers: unused initializers are unmapped, and mapped pages are dropped slice by slice as read."""

from __future__ import annotations

import mmap

import numpy as np
import onnx_ir as ir
from builders import mlp

from graphquant import graph_edit
from graphquant.analysis.runner import open_session
from graphquant.graph_edit import release_pages, remove_if_unused


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


class _AdviceLog:
    """Stands in for a tensor's mapping: records madvise calls."""

    closed = False

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []

    def madvise(self, option: int, start: int, length: int) -> None:
        self.calls.append((option, start, length))


def _mapped(tmp_path, array: np.ndarray) -> ir.ExternalTensor:
    """A tensor at a page-unaligned offset of a file, mapped."""
    (tmp_path / "w.bin").write_bytes(b"\0" * 100 + array.tobytes())
    tensor = ir.ExternalTensor(
        "w.bin", 100, array.nbytes, ir.DataType.FLOAT, shape=ir.Shape(array.shape), name="w", base_dir=tmp_path
    )
    tensor.numpy()
    return tensor


def test_release_pages_drops_only_whole_pages_inside_the_range(tmp_path):
    tensor = _mapped(tmp_path, np.zeros((4, mmap.PAGESIZE // 2), np.float32))  # each row is two pages long
    log = _AdviceLog()
    tensor.raw = log
    release_pages(tensor, 0, 2 * mmap.PAGESIZE)  # file bytes [100, 100 + 2 pages): one whole page, at 1 page
    release_pages(tensor, 0, 10)  # no whole page
    release_pages(ir.tensor(np.zeros(4, np.float32)), 0, 16)  # in memory: nothing to drop
    assert log.calls == [(mmap.MADV_DONTNEED, mmap.PAGESIZE, mmap.PAGESIZE)]


def test_read_in_slices_covers_every_row_and_drops_each_slice_after_it_is_read(tmp_path, monkeypatch):
    array = np.arange(6 * 1024, dtype=np.float32).reshape(6, 1024)
    tensor = _mapped(tmp_path, array)
    monkeypatch.setattr(graph_edit, "SLICE_ELEMENTS", 2048)  # two rows a slice
    dropped = []
    monkeypatch.setattr(graph_edit, "release_pages", lambda t, start, stop: dropped.append((start, stop)))
    copy = np.empty_like(array)
    for part in graph_edit.read_in_slices(tensor, tensor.numpy()):
        assert len(dropped) == part.start // 2  # the slice before this one is dropped, this one not yet
        copy[part] = tensor.numpy()[part]
    np.testing.assert_array_equal(copy, array)
    assert dropped == [(0, 8192), (8192, 16384), (16384, 24576)]
