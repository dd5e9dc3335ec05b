import os
import subprocess
import sys
import textwrap

import pytest

from pyro_bc import files
from pyro_bc.files import remove_orphaned_temporaries, torch_save_atomically, write_atomically


def _temporaries(folder):
    return sorted(p.name for p in folder.glob(".*.tmp"))


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_atomically(target, b"old")
    write_atomically(target, b"new")
    assert target.read_bytes() == b"new"
    assert _temporaries(target.parent) == []
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_write_removes_its_temporary_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    write_atomically(target, b"old")

    def failing_replace(src, dst):
        assert os.path.basename(src).startswith(f".out.bin.{os.getpid()}.")
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, b"new")
    assert target.read_bytes() == b"old"
    assert _temporaries(tmp_path) == []

    class Unsaveable:
        def __reduce__(self):
            raise TypeError("cannot pickle")

    with pytest.raises(TypeError):
        torch_save_atomically({"x": Unsaveable()}, target)
    assert _temporaries(tmp_path) == []


def test_a_killed_writer_leaves_a_temporary_the_next_write_removes(tmp_path):
    target = tmp_path / "checkpoint.pt"
    # The child blocks between writing its temporary and renaming it; then it is killed.
    child = textwrap.dedent(
        f"""
        import os, sys, time
        from pyro_bc import files

        def stuck(src, dst):
            print("written", flush=True)
            time.sleep(600)

        files.os.replace = stuck
        files.write_atomically({str(target)!r}, b"half")
        """
    )
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "written"
        (orphan,) = _temporaries(tmp_path)
        assert orphan.startswith(f".checkpoint.pt.{process.pid}.")
        # a live writer's temporary is left alone
        assert remove_orphaned_temporaries(target) == []
    finally:
        process.kill()
        process.wait()
    alive = tmp_path / f".checkpoint.pt.{os.getppid()}.abcd1234.tmp"
    alive.write_bytes(b"another live writer")
    unrelated = tmp_path / ".other.pt.999999999.abcd1234.tmp"
    unrelated.write_bytes(b"not ours")

    write_atomically(target, b"whole")
    assert target.read_bytes() == b"whole"
    assert _temporaries(tmp_path) == sorted([alive.name, unrelated.name])
