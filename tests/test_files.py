import os
import stat

import pytest

from tunnel_telemetry.files import write_private


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_private_is_atomic_and_0600(tmp_path):
    target = tmp_path / "k.pem"
    target.write_bytes(b"old")
    os.chmod(target, 0o644)
    inode = os.stat(target).st_ino
    write_private(target, b"new")
    assert target.read_bytes() == b"new" and mode(target) == 0o600
    assert os.stat(target).st_ino != inode  # replaced by rename, never rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.pem"]  # no temp file left


def test_write_private_failure_leaves_old_file(tmp_path, monkeypatch):
    target = tmp_path / "k.pem"
    target.write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_private(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.pem"]
