"""scratch_folder: a temporary folder that is always removed, and whose write failures name TMPDIR."""

from __future__ import annotations

import errno
import tempfile

import pytest

from graphquant.errors import OutputError
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
