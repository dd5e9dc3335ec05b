"""
MNIST loading for the Bayesian-compression experiments.

Two sources are supported:

* the full MNIST data set, read from a directory holding the four standard IDX
  files (gzipped or not), optionally downloaded from public mirrors; see
  :func:`load_mnist`;
* a small class-stratified subset shipped inside the package, which needs no
  network and no external files; see :func:`load_mnist_subset`.

Both return an :class:`MNISTData` tuple of tensors, images as float32 of shape
``(N, 1, 28, 28)`` and labels as int64 of shape ``(N,)``. By default pixels are
scaled to ``[-1, 1]``, as in the paper. :func:`load` chooses between the two
sources from one string, which is what the CLI and tutorials use.

Example::

    >>> from pyro_bc import data
    >>> mnist = data.load("subset")
    >>> train_loader, test_loader = data.mnist_loaders(mnist, batch_size=128)

Checksums are SHA-256 digests of the *uncompressed* IDX bytes, so they hold
for gzipped and plain copies alike and for mirrors that re-compress the files.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import urllib.request
import zlib
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, TensorDataset

from .files import write_atomically

__all__ = [
    "MNISTData",
    "MNISTDownloadError",
    "MNISTFileError",
    "default_data_dir",
    "download_mnist",
    "load",
    "load_mnist",
    "load_mnist_subset",
    "mnist_loaders",
    "read_idx",
    "write_idx",
]

#: Base names of the four MNIST files, keyed by the field they fill in :class:`MNISTData`.
MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}

#: SHA-256 of the uncompressed standard MNIST IDX files.
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

#: Mirrors serving ``<base name>.gz``, tried in order.
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

#: Package-data names of the shipped subset, keyed like :data:`MNIST_FILES`.
SUBSET_FILES = {
    "train_x": "mnist-subset-train-images-idx3-ubyte.gz",
    "train_y": "mnist-subset-train-labels-idx1-ubyte.gz",
    "test_x": "mnist-subset-t10k-images-idx3-ubyte.gz",
    "test_y": "mnist-subset-t10k-labels-idx1-ubyte.gz",
}
SUBSET_MANIFEST = "mnist-subset.json"

DATA_ENV_VAR = "PYRO_BC_DATA"
NORMALIZATIONS = ("symmetric", "unit", None)

_GZIP_MAGIC = b"\x1f\x8b"
_IDX_UBYTE = 0x08
_IDX_MAGIC = {0x00000801: "labels", 0x00000803: "images"}
_DOWNLOAD_TIMEOUT_S = 60


class MNISTFileError(ValueError):
    """
    Raised when an IDX file is malformed, truncated, corrupt, or fails its checksum.

    The message names the file, says what is wrong and what to do about it.

    Example::

        >>> try:
        ...     read_idx("broken-images-idx3-ubyte.gz")
        ... except MNISTFileError as e:
        ...     print(e)
    """


class MNISTDownloadError(OSError):
    """
    Raised when no mirror delivered a file with the expected checksum.

    Nothing is left behind in the target directory when this is raised.

    Example::

        >>> try:
        ...     download_mnist("~/data/mnist")
        ... except MNISTDownloadError as e:
        ...     print(e)  # lists every URL tried and why it failed
    """


class MNISTData(NamedTuple):
    """
    MNIST train and test tensors.

    Images are float32 of shape ``(N, 1, 28, 28)``; labels are int64 of shape ``(N,)``.

    Example::

        >>> mnist = load_mnist_subset()
        >>> mnist.train_x.shape, mnist.train_y.dtype
        (torch.Size([10000, 1, 28, 28]), torch.int64)
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


# ----------------------------------------------------------------------------
# IDX files


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """
    Read an unsigned-byte IDX file, gzipped or not, into a uint8 tensor.

    Compression is detected from the gzip magic bytes, not from the file name.
    Only the two MNIST layouts are accepted: images (magic ``0x00000803``,
    three dimensions) and labels (magic ``0x00000801``, one dimension).

    Example::

        >>> labels = read_idx("mnist/t10k-labels-idx1-ubyte.gz")
        >>> labels.shape, labels.dtype
        (torch.Size([10000]), torch.uint8)

    :param path: path to the ``.gz`` or uncompressed IDX file.
    :returns: a uint8 tensor with the shape declared in the file header.
    :raises MNISTFileError: if the file is not a valid IDX file.
    """
    path = Path(path)
    return _parse_idx(_decompress(path.read_bytes(), path), path)


def write_idx(path: str | os.PathLike, tensor: torch.Tensor, *, compress: bool = True) -> None:
    """
    Atomically write a uint8 tensor of 1 or 3 dimensions as an IDX file.

    With ``compress=True`` the file is gzipped at level 9 with a zero
    timestamp, so the output bytes depend only on the tensor.

    Example::

        >>> write_idx("labels-idx1-ubyte.gz", torch.tensor([3, 1, 4], dtype=torch.uint8))
        >>> read_idx("labels-idx1-ubyte.gz")
        tensor([3, 1, 4], dtype=torch.uint8)

    :param path: destination; its directory must exist.
    :param tensor: uint8 tensor of shape ``(N,)`` or ``(N, rows, cols)``.
    :param compress: whether to gzip the output.
    """
    if tensor.dtype != torch.uint8 or tensor.dim() not in (1, 3):
        raise ValueError(
            f"write_idx({str(path)!r}): expected a uint8 tensor with 1 or 3 dimensions, "
            f"got dtype {tensor.dtype} with shape {tuple(tensor.shape)}"
        )
    header = bytes([0, 0, _IDX_UBYTE, tensor.dim()])
    header += b"".join(size.to_bytes(4, "big") for size in tensor.shape)
    raw = header + tensor.contiguous().numpy().tobytes()
    if compress:
        raw = gzip.compress(raw, compresslevel=9, mtime=0)
    write_atomically(Path(path), raw)


def _decompress(content: bytes, source: str | os.PathLike) -> bytes:
    if not content.startswith(_GZIP_MAGIC):
        return content
    try:
        return gzip.decompress(content)
    except (OSError, EOFError, zlib.error) as e:
        raise MNISTFileError(
            f"{source}: corrupt or truncated gzip data ({e}). "
            "Delete the file and download or copy it again."
        ) from e


def _parse_idx(raw: bytes, source: str | os.PathLike) -> torch.Tensor:
    if len(raw) < 4:
        raise MNISTFileError(
            f"{source}: only {len(raw)} bytes, too short for an IDX header. "
            "The file is truncated or not an IDX file; replace it."
        )
    magic = int.from_bytes(raw[:4], "big")
    if magic not in _IDX_MAGIC:
        raise MNISTFileError(
            f"{source}: bad IDX magic number 0x{magic:08x}, expected 0x00000803 (images) or "
            "0x00000801 (labels). This is not an MNIST IDX file; check the path."
        )
    ndim = raw[3]
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise MNISTFileError(
            f"{source}: header declares {ndim} dimensions ({header_len} header bytes) but the "
            f"file has only {len(raw)} bytes. The file is truncated; replace it."
        )
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected, found = math.prod(shape), len(raw) - header_len
    if found != expected:
        problem = "truncated" if found < expected else "has trailing bytes"
        raise MNISTFileError(
            f"{source}: {problem}: header shape {tuple(shape)} needs {expected} data bytes, "
            f"found {found}. Delete the file and download or copy it again."
        )
    if found == 0:  # torch.frombuffer rejects empty views
        return torch.empty(shape, dtype=torch.uint8)
    # A bytearray gives torch.frombuffer a writable buffer that the tensor then owns.
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header_len, count=found)
    return data.reshape(shape)


def _sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


# ----------------------------------------------------------------------------
# Full MNIST


def default_data_dir() -> Path:
    """
    Directory searched for MNIST when no ``root`` is given.

    This is ``$PYRO_BC_DATA`` if set, else ``$XDG_CACHE_HOME/pyro_bc/mnist``,
    else ``~/.cache/pyro_bc/mnist``.

    Example::

        >>> default_data_dir()
        PosixPath('/home/me/.cache/pyro_bc/mnist')
    """
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "pyro_bc" / "mnist"


def _find_idx_file(root: Path, base_name: str) -> Path | None:
    for name in (base_name + ".gz", base_name):
        if (root / name).is_file():
            return root / name
    return None


def _missing_files(root: Path) -> list[str]:
    return [name for name in MNIST_FILES.values() if _find_idx_file(root, name) is None]


def download_mnist(
    root: str | os.PathLike | None = None, *, mirrors: tuple[str, ...] | None = None
) -> Path:
    """
    Download the MNIST files missing from ``root`` and verify their checksums.

    Each file is fetched as ``<mirror><name>.gz`` from the first mirror that
    delivers it with the expected SHA-256, written to a temporary file and
    moved into place with :func:`os.replace`, so an interrupted or failed
    download never leaves a partial or unverified file behind.

    Example::

        >>> download_mnist()  # into default_data_dir()
        PosixPath('/home/me/.cache/pyro_bc/mnist')

    :param root: target directory, created if needed; default :func:`default_data_dir`.
    :param mirrors: base URLs ending in ``/``, tried in order; default :data:`MNIST_MIRRORS`.
    :returns: the directory now holding all four files.
    :raises MNISTDownloadError: if some file could not be fetched from any mirror.
    """
    root = Path(root).expanduser() if root is not None else default_data_dir()
    root.mkdir(parents=True, exist_ok=True)
    for base_name in _missing_files(root):
        _download_file(root, base_name, MNIST_MIRRORS if mirrors is None else mirrors)
    return root


def _download_file(root: Path, base_name: str, mirrors: tuple[str, ...]) -> None:
    target = root / (base_name + ".gz")
    failures = []
    for mirror in mirrors:
        url = mirror + target.name
        try:
            content = _fetch(url)
        except OSError as e:  # urllib.error.URLError and socket timeouts are OSErrors
            failures.append(f"{url}: {e}")
            continue
        try:
            digest = _sha256(_decompress(content, url))
        except MNISTFileError as e:
            failures.append(str(e))
            continue
        if digest != MNIST_SHA256[base_name]:
            failures.append(
                f"{url}: checksum mismatch, SHA-256 of contents is {digest}, "
                f"expected {MNIST_SHA256[base_name]}"
            )
            continue
        write_atomically(target, content)
        return
    raise MNISTDownloadError(
        f"Could not download {target.name} into {root}:\n  "
        + "\n  ".join(failures)
        + f"\nCopy the standard MNIST files into {root} by hand, or pass root= / set "
        f"{DATA_ENV_VAR} to a directory that has them."
    )


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
        return response.read()


def load_mnist(
    root: str | os.PathLike | None = None,
    *,
    download: bool = False,
    normalize: str | None = "symmetric",
    verify: bool = False,
) -> MNISTData:
    """
    Load the full MNIST data set (60,000 train and 10,000 test images).

    The directory is ``root`` if given, else :func:`default_data_dir`
    (``$PYRO_BC_DATA`` or the user cache). It must hold the four standard
    files, named ``train-images-idx3-ubyte`` etc., with or without ``.gz``.
    Downloads are always checksummed; files already on disk are checksummed
    only with ``verify=True``, because hashing costs about as much as loading
    and the IDX parser already catches truncated or corrupt files.

    Example::

        >>> mnist = load_mnist("~/data/mnist", normalize="unit")
        >>> mnist.train_x.shape, float(mnist.train_x.max())
        (torch.Size([60000, 1, 28, 28]), 1.0)

    :param root: directory holding the MNIST files.
    :param download: fetch missing files from public mirrors into that directory.
    :param normalize: ``"symmetric"`` scales pixels to ``[-1, 1]`` (as in the
        paper), ``"unit"`` to ``[0, 1]``, ``None`` (or ``"none"``) keeps raw
        ``0..255`` values as float.
    :param verify: check local files against the standard SHA-256 checksums.
    :raises FileNotFoundError: if files are missing and ``download`` is False.
    :raises MNISTFileError: if a file is malformed or fails verification.
    """
    normalize = _check_normalize(normalize)
    root = Path(root).expanduser() if root is not None else default_data_dir()
    missing = _missing_files(root)
    if missing and download:
        download_mnist(root)
    elif missing:
        raise FileNotFoundError(
            f"MNIST files not found in {root}: {', '.join(missing)} (with or without .gz). "
            f"Pass root= a directory holding them, set {DATA_ENV_VAR} to one, or use "
            "download=True to fetch them into that directory."
        )
    tensors = {}
    for field, base_name in MNIST_FILES.items():
        path = _find_idx_file(root, base_name)
        raw = _decompress(path.read_bytes(), path)
        if verify and _sha256(raw) != MNIST_SHA256[base_name]:
            raise MNISTFileError(
                f"{path}: checksum mismatch, this is not the standard MNIST file. "
                "Delete it and download it again (download=True)."
            )
        tensors[field] = _parse_idx(raw, path)
    return _to_mnist_data(tensors, normalize, source=root)


# ----------------------------------------------------------------------------
# Shipped subset


def load_mnist_subset(*, normalize: str | None = "symmetric") -> MNISTData:
    """
    Load the class-stratified MNIST subset shipped with the package.

    It holds 1,000 training and 200 test images per class (10,000 and 2,000 in
    all), drawn with a fixed seed by ``scripts/make_mnist_subset.py``. Files
    are checked against the SHA-256 sums in the shipped manifest. No network
    access and no external files are needed.

    Example::

        >>> mnist = load_mnist_subset(normalize="unit")
        >>> mnist.train_x.shape, mnist.test_y.bincount()
        (torch.Size([10000, 1, 28, 28]), tensor([200, 200, 200, 200, 200, 200, 200, 200, 200, 200]))

    :param normalize: as in :func:`load_mnist`.
    :raises MNISTFileError: if a shipped file is damaged.
    """
    normalize = _check_normalize(normalize)
    package_dir = _subset_dir()
    manifest = json.loads((package_dir / SUBSET_MANIFEST).read_text())
    tensors = {}
    for field, name in SUBSET_FILES.items():
        resource = package_dir / name
        raw = _decompress(resource.read_bytes(), resource)
        if _sha256(raw) != manifest["files"][name]["sha256_uncompressed"]:
            raise MNISTFileError(
                f"{resource}: checksum does not match {SUBSET_MANIFEST}; the installed package is "
                "damaged. Reinstall pyro_bc or rerun scripts/make_mnist_subset.py."
            )
        tensors[field] = _parse_idx(raw, resource)
    return _to_mnist_data(tensors, normalize, source=package_dir)


def _subset_dir():
    # importlib.resources also works when the package is installed as a zip.
    return resources.files("pyro_bc") / "data_files"


# ----------------------------------------------------------------------------
# Conversion, loaders and the single entry point


def _check_normalize(normalize: str | None) -> str | None:
    normalize = None if normalize == "none" else normalize
    if normalize not in NORMALIZATIONS:
        raise ValueError(
            f"normalize={normalize!r} is not supported; use 'symmetric' ([-1, 1]), "
            "'unit' ([0, 1]) or None (raw 0..255)."
        )
    return normalize


def _to_float_images(images: torch.Tensor, normalize: str | None) -> torch.Tensor:
    x = images.to(torch.float32).unsqueeze(1)  # add the channel dimension
    if normalize == "symmetric":
        return x.div_(127.5).sub_(1.0)
    if normalize == "unit":
        return x.div_(255.0)
    return x


def _to_mnist_data(tensors: dict, normalize: str | None, source) -> MNISTData:
    for split in ("train", "test"):
        images, labels = tensors[f"{split}_x"], tensors[f"{split}_y"]
        if images.dim() != 3 or images.shape[1:] != (28, 28) or labels.dim() != 1:
            raise MNISTFileError(
                f"{source}: {split} images have shape {tuple(images.shape)} and labels "
                f"{tuple(labels.shape)}; expected (N, 28, 28) and (N,). Check that the image "
                "and label files are not swapped or from another data set."
            )
        if len(images) != len(labels):
            raise MNISTFileError(
                f"{source}: {len(images)} {split} images but {len(labels)} labels. "
                "The files come from different data sets; replace them."
            )
        if len(labels) and int(labels.max()) > 9:
            raise MNISTFileError(
                f"{source}: {split} labels go up to {int(labels.max())}, MNIST has only 0..9. "
                "Check that the label files are MNIST's."
            )
    return MNISTData(
        train_x=_to_float_images(tensors["train_x"], normalize),
        train_y=tensors["train_y"].long(),
        test_x=_to_float_images(tensors["test_x"], normalize),
        test_y=tensors["test_y"].long(),
    )


def mnist_loaders(
    data: MNISTData,
    batch_size: int = 128,
    test_batch_size: int = 1000,
    *,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[DataLoader, DataLoader]:
    """
    Wrap :class:`MNISTData` in train and test data loaders.

    The training loader reshuffles every epoch when ``shuffle`` is set (pass a
    seeded ``generator`` for a reproducible order); the test loader keeps the
    stored order.

    Example::

        >>> train_loader, test_loader = mnist_loaders(load("subset"), batch_size=64)
        >>> x, y = next(iter(train_loader))
        >>> x.shape, y.shape
        (torch.Size([64, 1, 28, 28]), torch.Size([64]))

    :returns: ``(train_loader, test_loader)`` yielding ``(images, labels)`` batches.
    """
    train = TensorDataset(data.train_x, data.train_y)
    test = TensorDataset(data.test_x, data.test_y)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=shuffle, generator=generator),
        DataLoader(test, batch_size=test_batch_size, shuffle=False),
    )


def load(
    source: str | os.PathLike | None = "subset",
    *,
    normalize: str | None = "symmetric",
    download: bool = False,
) -> MNISTData:
    """
    Load MNIST from one string, as the CLI and tutorials do.

    ``"subset"`` loads the shipped subset (:func:`load_mnist_subset`);
    ``"mnist"`` or ``None`` loads full MNIST from :func:`default_data_dir`;
    anything else is taken as a directory holding the full MNIST files.

    Example::

        >>> load("subset").train_x.shape
        torch.Size([10000, 1, 28, 28])
        >>> load("/data/mnist", normalize="unit").train_x.shape
        torch.Size([60000, 1, 28, 28])

    :param source: ``"subset"``, ``"mnist"``, ``None`` or a directory.
    :param normalize: as in :func:`load_mnist`.
    :param download: for full MNIST, fetch missing files (see :func:`load_mnist`).
    """
    if source == "subset":
        return load_mnist_subset(normalize=normalize)
    root = None if source in (None, "mnist") else source
    return load_mnist(root, download=download, normalize=normalize)
