"""Atomic writes: a file pyro_bc writes is either the old one or the whole new one."""

from __future__ import annotations

import contextlib
import io
import os
import secrets
from pathlib import Path

import torch


def _temporary_name(path: Path) -> Path:
    # The writer's pid in the name tells a later writer whether the temporary is orphaned.
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # another user's live process, or a platform that cannot tell
    return True


def remove_orphaned_temporaries(path) -> list[Path]:
    """Removes temporaries of ``path`` left by writers that were killed (their pid is gone).

    :func:`write_atomically` calls it before every write; it returns the files it removed.

    Example::

        remove_orphaned_temporaries("run/checkpoint.pt")  # [] when no writer was killed
    """
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    prefix = f".{path.name}."
    for candidate in path.parent.iterdir():
        name = candidate.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        parts = name[len(prefix) : -len(".tmp")].split(".")
        if len(parts) != 2 or not parts[0].isdigit() or _pid_alive(int(parts[0])):
            continue
        with contextlib.suppress(FileNotFoundError):
            candidate.unlink()
            removed.append(candidate)
    return removed


def write_atomically(path, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path``, then renames it over ``path``.

    The temporary file (``.{name}.{pid}.{random}.tmp``) is in the same folder so that the rename
    stays on one file system and is atomic. It is removed if anything fails; one left by a
    writer that was killed is removed by the next write to ``path``.

    Example::

        write_atomically("run/summary.json", json.dumps(summary).encode())
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temporaries(path)
    tmp = _temporary_name(path)
    # O_EXCL: never write through a file or link someone else put at this name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(folder: Path) -> None:
    # makes the rename itself durable; not every platform can open a directory
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def torch_save_atomically(obj, path) -> None:
    """``torch.save`` through :func:`write_atomically`: never a half-written checkpoint.

    Example::

        torch_save_atomically({"guide": guide.state_dict()}, "run/checkpoint.pt")
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomically(path, buffer.getvalue())
