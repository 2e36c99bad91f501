"""scratch: temporary folders that are always removed (write failures name TMPDIR), and file-backed arrays."""

from __future__ import annotations

import errno
import os
import tempfile

import numpy as np
import onnx_ir as ir
import pytest

from graphquant import scratch
from graphquant.errors import OutputError
from graphquant.graph_edit import release_mapping
from graphquant.scratch import scratch_folder


def test_the_folder_is_made_under_tmpdir_and_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with scratch_folder() as folder:
        (folder / "model.onnx").write_bytes(b"1234")
        assert folder.parent == tmp_path and folder.name.startswith("graphquant-")
    assert list(tmp_path.iterdir()) == []


def test_a_write_failure_inside_is_an_output_error_naming_tmpdir(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    message = f"{tmp_path}: cannot write temporary files \\(No space left on device\\)"
    with pytest.raises(OutputError, match=message), scratch_folder():
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_a_missing_tmpdir_is_an_output_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))
    with pytest.raises(OutputError, match="gone: cannot write temporary files"), scratch_folder():
        pass


def test_other_errors_pass_through(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(KeyError), scratch_folder():
        raise KeyError("not a file-system error")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix", reason="file-backed arrays need files that stay mapped once unlinked")
def test_a_large_array_is_file_backed_and_keeps_its_values_when_its_pages_are_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(scratch, "FILE_BACKED_BYTES", 4096)
    small = scratch.file_backed_array((1023,), np.dtype(np.float32))
    large = scratch.file_backed_array((64, 16), np.dtype(np.float32))
    assert scratch.file_mapping(small) is None and scratch.file_mapping(large) is not None
    assert list(tmp_path.iterdir()) == []  # the file is unlinked already: it goes with the array
    large[:] = np.arange(large.size, dtype=np.float32).reshape(large.shape)
    tensor = ir.Tensor(large, name="w")
    release_mapping(tensor)  # drops the resident pages; they are read back from the file
    scratch.drop_pages(large[8:])
    np.testing.assert_array_equal(tensor.numpy(), np.arange(1024, dtype=np.float32).reshape(64, 16))


def test_a_mapping_it_did_not_make_is_never_taken_for_a_file_backed_one(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.ones(4096, np.float32))
    copied = np.load(path, mmap_mode="c")  # private pages: dropping them would lose writes
    copied[0] = 5.0
    assert scratch.file_mapping(copied) is None
    scratch.drop_pages(copied)
    assert copied[0] == 5.0
