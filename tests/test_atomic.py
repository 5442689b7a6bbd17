"""latentspace._atomic, under every file the library saves: an error names the path the caller
gave (never the hidden temporary file beside it), and nothing is left behind."""

from __future__ import annotations

import os

import numpy as np
import pytest

import latentspace as ls
from latentspace._atomic import atomic_path, atomic_write


def test_a_missing_folder_is_named_by_the_path_asked_for(tmp_path):
    target = tmp_path / "no" / "such" / "file.bin"
    with pytest.raises(FileNotFoundError, match=f"path: cannot write {target}: folder {target.parent} does not exist") as caught:
        with atomic_write(target) as f:
            f.write(b"x")
    assert ".tmp" not in str(caught.value)
    assert not (tmp_path / "no").exists()


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError, match=f"path: {tmp_path} is a folder; pass a file path"):
        with atomic_path(tmp_path):
            pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_named_by_the_path_asked_for(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=f"path: cannot write {folder / 'm.st'}: folder {folder} is not"):
            with atomic_write(folder / "m.st") as f:
                f.write(b"x")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


def test_saving_an_index_into_a_missing_folder_names_the_file(tmp_path):
    index = ls.FlatIndex(3)
    index.add(np.ones((2, 3), np.float32))
    target = tmp_path / "missing" / "i.lsidx"
    with pytest.raises(FileNotFoundError, match=f"{target}: folder {target.parent} does not exist"):
        index.save(target)
