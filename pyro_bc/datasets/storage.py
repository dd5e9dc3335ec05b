"""
Data files on disk: bounded reads, remembered checksums, verified downloads, safe extraction.

Everything here protects the loaders from files that are not what they claim to be:

* :func:`read_capped` reads a file, gunzipping it in a streaming way when it starts with the
  gzip magic bytes, and refuses to produce more than a cap, so a small ``.gz`` that inflates to
  gigabytes fails after reading just past the cap, with bounded memory;
* :func:`content_sha256` hashes a file's (uncompressed) contents once and remembers the digest
  in a small stamp file beside it, keyed by the file's size and modification time;
* :func:`fetch` downloads to a temporary file, checking the size cap and digest on the way, and
  moves it into place only when it is verified;
* :func:`extract_tar` extracts the regular files of a tar archive, never outside the target.

Example::

    >>> path = "mnist/t10k-labels-idx1-ubyte.gz"
    >>> content_sha256(path, lambda: read_capped(path, max_bytes=10_008))[:8]
    'ff7bcfd4'
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import tarfile
import tempfile
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

from ..files import write_atomically

__all__ = [
    "DataDownloadError",
    "DataFileError",
    "STAMP_NAME",
    "cache_dir",
    "content_sha256",
    "decompress_capped",
    "extract_tar",
    "fetch",
    "read_capped",
]

#: Name of the stamp file that remembers the digests of the data files beside it.
STAMP_NAME = ".pyro_bc-checksums.json"

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20
_DOWNLOAD_TIMEOUT_S = 60


class DataFileError(ValueError):
    """
    Raised when a data file is malformed, truncated, too large, corrupt or fails its checksum.

    The message names the file, says what is wrong and what to do about it.

    Example::

        >>> try:
        ...     load_mnist("~/data/mnist")
        ... except DataFileError as e:
        ...     print(e)
    """


class DataDownloadError(OSError):
    """
    Raised when no URL delivered a file with the expected checksum.

    Nothing is left behind in the target directory when this is raised.

    Example::

        >>> try:
        ...     load_cifar10("~/data/cifar10", download=True)
        ... except DataDownloadError as e:
        ...     print(e)  # every URL tried and why it failed
    """


def cache_dir(name: str) -> Path:
    """
    The user cache folder of one data set: ``$XDG_CACHE_HOME/pyro_bc/<name>``.

    Without ``XDG_CACHE_HOME`` this is ``~/.cache/pyro_bc/<name>``.

    Example::

        >>> cache_dir("cifar10")
        PosixPath('/home/me/.cache/pyro_bc/cifar10')
    """
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "pyro_bc" / name


def read_capped(path: str | os.PathLike, max_bytes: int) -> bytes:
    """
    Read a file, gunzipping it if it starts with the gzip magic bytes, up to ``max_bytes``.

    Decompression streams in 1 MiB chunks and stops one byte past the cap, so memory stays
    within about ``max_bytes`` whatever the compressed file inflates to.

    Example::

        >>> len(read_capped("mnist/t10k-labels-idx1-ubyte.gz", max_bytes=10_008))
        10008

    :raises DataFileError: if the contents exceed ``max_bytes`` or the gzip data is corrupt.
    """
    path = Path(path)
    with open(path, "rb") as f:
        return _read_stream(f, max_bytes, path)


def decompress_capped(content: bytes, max_bytes: int, source: str | os.PathLike) -> bytes:
    """
    :func:`read_capped` for bytes already in memory; ``source`` names them in errors.

    Example::

        >>> decompress_capped(gzip.compress(b"abc"), max_bytes=3, source="abc.gz")
        b'abc'
    """
    return _read_stream(io.BytesIO(content), max_bytes, source)


def _read_stream(f, max_bytes: int, source) -> bytes:
    compressed = f.read(2) == _GZIP_MAGIC
    f.seek(0)
    parts, size = [], 0
    try:
        stream = gzip.GzipFile(fileobj=f, mode="rb") if compressed else f
        while size <= max_bytes:
            chunk = stream.read(min(_CHUNK, max_bytes + 1 - size))
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
    except (OSError, EOFError, zlib.error) as e:
        raise DataFileError(
            f"{source}: corrupt or truncated gzip data ({e}). "
            "Delete the file and download or copy it again."
        ) from e
    if size > max_bytes:
        what = "decompresses to" if compressed else "holds"
        raise DataFileError(
            f"{source}: {what} more than {max_bytes:,} bytes, the most this file can hold. "
            "It is not the expected data file (or is a decompression bomb); delete it and "
            "download or copy it again."
        )
    return b"".join(parts)


def _file_key(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_stamps(directory: Path) -> dict:
    try:
        stamps = json.loads((directory / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return {}  # no stamp or a damaged one: hash again and write a fresh one
    return stamps if isinstance(stamps, dict) else {}


def content_sha256(path: str | os.PathLike, read=None) -> str:
    """
    SHA-256 of a file's contents (``read()``, e.g. its uncompressed bytes), computed once.

    The digest is remembered in a stamp file (:data:`STAMP_NAME`, written atomically) beside
    the file, keyed by the file's name, size and modification time; while they are unchanged
    the remembered digest is returned without reading the file. Where the directory is not
    writable the digest is simply computed every time.

    Example::

        >>> path = "mnist/train-labels-idx1-ubyte.gz"
        >>> content_sha256(path, lambda: read_capped(path, 60_008))  # hashes and stamps
        '65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5'
        >>> content_sha256(path, lambda: read_capped(path, 60_008))  # reads only the stamp

    :param read: called (only if the stamp does not hold the digest) for the bytes to hash;
        if ``None`` the file's own bytes are hashed (no cap: pass ``read`` for untrusted files).
    """
    path = Path(path)
    key = _file_key(path)
    stamps = _read_stamps(path.parent)
    entry = stamps.get(path.name)
    if (
        isinstance(entry, dict)
        and {k: entry.get(k) for k in key} == key
        and isinstance(entry.get("sha256"), str)  # a damaged stamp is hashed again, not trusted
    ):
        return entry["sha256"]
    digest = hashlib.sha256(path.read_bytes() if read is None else read()).hexdigest()
    stamps[path.name] = {**key, "sha256": digest}
    with contextlib.suppress(OSError):  # a read-only data folder only loses the shortcut
        write_atomically(path.parent / STAMP_NAME, json.dumps(stamps, indent=1).encode())
    return digest


def fetch(url: str, target: str | os.PathLike, *, max_bytes: int, md5: str | None = None) -> None:
    """
    Download ``url`` to ``target``, streaming, with a size cap and an optional MD5 check.

    The bytes go to a temporary file beside ``target`` that is renamed over it only once the
    whole download has arrived within ``max_bytes`` and matches ``md5``; otherwise it is
    removed and nothing is left behind.

    Example::

        >>> fetch("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        ...       "cifar-10-binary.tar.gz", max_bytes=170_052_171,
        ...       md5="c32a1d4ab5d03f1284b67883e8d87530")

    :raises DataDownloadError: on a network error, an oversized download or a wrong MD5.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        digest, size = hashlib.md5(usedforsecurity=False), 0
        with os.fdopen(fd, "wb") as out:
            with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
                while chunk := response.read(_CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise DataDownloadError(
                            f"{url}: more than {max_bytes:,} bytes, larger than the expected "
                            "file; the server sent something else."
                        )
                    digest.update(chunk)
                    out.write(chunk)
        if md5 is not None and digest.hexdigest() != md5:
            raise DataDownloadError(
                f"{url}: checksum mismatch, MD5 of the {size:,} bytes received is "
                f"{digest.hexdigest()}, expected {md5}."
            )
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def extract_tar(
    archive: str | os.PathLike, directory: str | os.PathLike, members: set[str]
) -> list[Path]:
    """
    Extract the regular files named in ``members`` from a tar archive into ``directory``.

    Only the listed names are extracted, each written atomically; a listed name that is a
    link, a device or a directory, or that would land outside ``directory`` (absolute paths,
    ``..``), is refused. This is safe for untrusted archives on every Python version.

    Example::

        >>> extract_tar("cifar-10-binary.tar.gz", "data",
        ...             {"cifar-10-batches-bin/test_batch.bin"})
        [PosixPath('data/cifar-10-batches-bin/test_batch.bin')]

    :raises DataFileError: if the archive is corrupt, lacks a member or holds an unsafe one.
    """
    archive, directory = Path(archive), Path(directory)
    written, missing = [], set(members)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for info in tar:
                if info.name not in missing:
                    continue
                parts = PurePosixPath(info.name).parts
                if not info.isfile() or info.name.startswith("/") or ".." in parts:
                    raise DataFileError(
                        f"{archive}: member {info.name!r} is not a plain file inside the "
                        "archive's folder; refusing to extract it. Delete the archive and "
                        "download it again from the official source."
                    )
                source = tar.extractfile(info)
                target = directory.joinpath(*parts)
                write_atomically(target, source.read())
                written.append(target)
                missing.discard(info.name)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise DataFileError(
            f"{archive}: corrupt or truncated archive ({e}). Delete it and download it again."
        ) from e
    if missing:
        raise DataFileError(
            f"{archive}: lacks {', '.join(sorted(missing))}. It is not the expected archive; "
            "delete it and download it again."
        )
    return written
