"""iepkt_tf.atomic: complete file or old file, never a half-written one; normal permissions."""
import os

import pytest

from iepkt_tf.atomic import atomic_open, write_bytes


def test_replaces_whole_and_uses_umask_permissions(tmp_path):
    path = tmp_path / "sub" / "out.bin"
    write_bytes(path, b"old")
    write_bytes(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~mask)
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.bin"]


def test_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "log.json"
    write_bytes(path, b"good")
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.write("half")
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["log.json"]
