"""fsutil: files written atomically get the mode a plain open() would give them; make_dir proves writability."""

import contextlib
import os
import stat

import pytest

from ambient_mri.fsutil import OutputError, atomic_h5, atomic_path, make_dir, umask, write_json


@contextlib.contextmanager
def process_umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002, 0o027])
def test_atomic_files_respect_the_umask_like_open(tmp_path, mask):
    with process_umask(mask):
        assert umask() == mask
        with open(tmp_path / "plain.txt", "w") as f:  # the reference: what the OS gives a normal new file
            f.write("x")
        with atomic_path(tmp_path / "atomic.txt") as tmp:
            tmp.write_text("x")
        write_json(tmp_path / "a.json", {"a": 1})
        with atomic_h5(tmp_path / "a.h5") as f:
            f["x"] = [1, 2]
        with atomic_path(tmp_path / "atomic.txt") as tmp:  # replacing an existing file
            tmp.write_text("y")
    want = mode(tmp_path / "plain.txt")
    assert want == 0o666 & ~mask
    for name in ("atomic.txt", "a.json", "a.h5"):
        assert mode(tmp_path / name) == want, (name, oct(mode(tmp_path / name)), oct(want))


def test_make_dir_leaves_no_probe_and_refuses_an_unwritable_place(tmp_path):
    d = make_dir(tmp_path / "a" / "b")
    assert d.is_dir() and list(d.iterdir()) == []
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OutputError, match="Not a directory"):
        make_dir(tmp_path / "file" / "out")
