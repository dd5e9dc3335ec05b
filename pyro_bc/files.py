"""Atomic writes: a file pyro_bc writes is either the old one or the whole new one."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

import torch


def write_atomically(path, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path``, then renames it over ``path``.

    The temporary file is in the same folder so that the rename stays on one file system and is
    atomic; it is removed if anything fails.

    Example::

        write_atomically("run/summary.json", json.dumps(summary).encode())
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; give it the permissions open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def torch_save_atomically(obj, path) -> None:
    """``torch.save`` through :func:`write_atomically`: never a half-written checkpoint.

    Example::

        torch_save_atomically({"guide": guide.state_dict()}, "run/checkpoint.pt")
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomically(path, buffer.getvalue())
