"""
MNIST: the full data set from a folder or the user cache, or the subset shipped in the package.

:func:`load_mnist` takes one string: ``"subset"`` (10,000 training and 2,000 test images shipped
with pyro_bc, no files or network needed), ``"mnist"`` (the user cache, see
:func:`default_mnist_dir`) or a directory holding the four standard IDX files, gzipped or not.
Images come back as float32 ``(N, 1, 28, 28)``, by default scaled to ``[-1, 1]`` as in the
paper; labels as int64 ``(N,)``.

Every file is read with a cap at its standard size (a ``.gz`` that inflates to gigabytes fails
after reading just past it) and checked against the standard SHA-256 of its uncompressed
contents. The digest is computed once and remembered in a stamp file beside the data (keyed by
size and modification time), so later loads skip hashing. The checksums hold for gzipped and
plain copies alike and for mirrors that re-compress the files.

Example::

    >>> from pyro_bc.datasets import load_mnist, train_test_loaders
    >>> mnist = load_mnist("subset")
    >>> train_loader, test_loader = train_test_loaders(mnist, batch_size=128)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import urllib.request
from importlib import resources
from pathlib import Path

import torch

from ..files import write_atomically
from .idx import parse_idx
from .splits import ImageData
from .storage import (
    DataDownloadError,
    DataFileError,
    cache_dir,
    content_sha256,
    decompress_capped,
    read_capped,
)

__all__ = [
    "DATA_ENV_VAR",
    "MNIST_FILES",
    "MNIST_SHA256",
    "default_mnist_dir",
    "download_mnist",
    "load_mnist",
    "load_mnist_subset",
]

#: Base names of the four MNIST files, keyed by the field they fill in :class:`ImageData`.
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

#: Uncompressed sizes of the standard files: header plus one byte per pixel or label. They
#: cap every read, so nothing larger is ever inflated into memory.
MNIST_BYTES = {
    "train-images-idx3-ubyte": 16 + 60_000 * 28 * 28,
    "train-labels-idx1-ubyte": 8 + 60_000,
    "t10k-images-idx3-ubyte": 16 + 10_000 * 28 * 28,
    "t10k-labels-idx1-ubyte": 8 + 10_000,
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
_DOWNLOAD_TIMEOUT_S = 60


def default_mnist_dir() -> Path:
    """
    Directory that ``load_mnist("mnist")`` reads: ``$PYRO_BC_DATA`` or the user cache.

    This is ``$PYRO_BC_DATA`` if set, else ``$XDG_CACHE_HOME/pyro_bc/mnist``, else
    ``~/.cache/pyro_bc/mnist``.

    Example::

        >>> default_mnist_dir()
        PosixPath('/home/me/.cache/pyro_bc/mnist')
    """
    env = os.environ.get(DATA_ENV_VAR)
    return Path(env).expanduser() if env else cache_dir("mnist")


def _copies(root: Path, base_name: str) -> list[Path]:
    return [p for p in (root / (base_name + ".gz"), root / base_name) if p.is_file()]


def _missing_files(root: Path) -> list[str]:
    return [name for name in MNIST_FILES.values() if not _copies(root, name)]


# ----------------------------------------------------------------------------
# Downloads


def download_mnist(
    root: str | os.PathLike | None = None, *, mirrors: tuple[str, ...] | None = None
) -> Path:
    """
    Download the MNIST files missing from ``root`` and verify their checksums.

    Each file is fetched as ``<mirror><name>.gz`` from the first mirror that delivers it with
    the expected SHA-256 and written atomically, so a failed download never leaves a partial
    or unverified file behind.

    Example::

        >>> download_mnist()  # into default_mnist_dir()
        PosixPath('/home/me/.cache/pyro_bc/mnist')

    :param root: target directory, created if needed; default :func:`default_mnist_dir`.
    :param mirrors: base URLs ending in ``/``, tried in order; default :data:`MNIST_MIRRORS`.
    :returns: the directory now holding all four files.
    :raises DataDownloadError: if some file could not be fetched from any mirror.
    """
    root = Path(root).expanduser() if root is not None else default_mnist_dir()
    root.mkdir(parents=True, exist_ok=True)
    for base_name in _missing_files(root):
        _download_file(root, base_name, MNIST_MIRRORS if mirrors is None else mirrors)
    return root


def _download_file(root: Path, base_name: str, mirrors: tuple[str, ...]) -> None:
    target = root / (base_name + ".gz")
    cap = MNIST_BYTES[base_name]
    failures = []
    for mirror in mirrors:
        url = mirror + target.name
        try:
            with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
                content = response.read(cap + 1)  # a compressed file is smaller than its contents
        except OSError as e:  # urllib.error.URLError and socket timeouts are OSErrors
            failures.append(f"{url}: {e}")
            continue
        try:
            if len(content) > cap:
                raise DataFileError(f"{url}: more than {cap:,} bytes, not the MNIST file")
            digest = hashlib.sha256(decompress_capped(content, cap, url)).hexdigest()
        except DataFileError as e:
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
    raise DataDownloadError(
        f"Could not download {target.name} into {root}:\n  "
        + "\n  ".join(failures)
        + f"\nCopy the standard MNIST files into {root} by hand, or pass a directory that has "
        f"them (load_mnist(DIR), pyro-bc run --data DIR) or set {DATA_ENV_VAR} to one."
    )


# ----------------------------------------------------------------------------
# Loading


def load_mnist(
    source: str | os.PathLike | None = "mnist",
    *,
    download: bool = False,
    normalize: str | None = "symmetric",
    verify: bool = True,
) -> ImageData:
    """
    Load MNIST: the shipped subset, the user cache or a directory of the four standard files.

    ``"subset"`` loads :func:`load_mnist_subset`; ``"mnist"`` or ``None`` loads full MNIST from
    :func:`default_mnist_dir`; anything else is a directory holding ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``,
    each with or without ``.gz`` (write ``./subset`` for a folder named ``subset``). Where
    both a ``.gz`` and a plain copy exist they must hold the same contents.

    Example::

        >>> load_mnist("subset").train_x.shape
        torch.Size([10000, 1, 28, 28])
        >>> load_mnist("~/data/mnist", normalize="unit").train_x.shape
        torch.Size([60000, 1, 28, 28])

    :param source: ``"subset"``, ``"mnist"``, ``None`` or a directory.
    :param download: fetch missing files of full MNIST from public mirrors into the directory.
    :param normalize: ``"symmetric"`` scales pixels to ``[-1, 1]`` (as in the paper),
        ``"unit"`` to ``[0, 1]``, ``None`` (or ``"none"``) keeps raw ``0..255`` values as float.
    :param verify: check every file against the standard SHA-256 (once per file: the verdict
        is remembered beside it). ``verify=False`` loads modified MNIST files on purpose.
    :raises FileNotFoundError: if files are missing and ``download`` is False.
    :raises DataFileError: if a file is malformed, too large or fails verification.
    """
    normalize = _check_normalize(normalize)
    if source == "subset":
        return load_mnist_subset(normalize=normalize)
    root = default_mnist_dir() if source in (None, "mnist") else Path(source).expanduser()
    if download:
        download_mnist(root)
    missing = _missing_files(root)
    if missing:
        raise FileNotFoundError(
            f"MNIST files not found in {root}: {', '.join(missing)} (with or without .gz). "
            f"Pass a directory holding them (load_mnist(DIR), pyro-bc run --data DIR), set "
            f"{DATA_ENV_VAR} to one, or use download=True to fetch them into that directory."
        )
    tensors, paths = {}, {}
    for field, base_name in MNIST_FILES.items():
        paths[field], raw = _read_mnist_file(root, base_name, verify)
        tensors[field] = parse_idx(raw, paths[field])
    return _to_image_data(tensors, paths, normalize)


def _read_mnist_file(root: Path, base_name: str, verify: bool) -> tuple[Path, bytes]:
    copies = _copies(root, base_name)
    cap = MNIST_BYTES[base_name]
    contents = {}

    def read(path):
        if path not in contents:
            contents[path] = read_capped(path, cap)
        return contents[path]

    if verify or len(copies) > 1:
        digests = [content_sha256(path, lambda path=path: read(path)) for path in copies]
        if len(set(digests)) > 1:
            raise DataFileError(
                f"{copies[0]} and {copies[1]} hold different contents. Delete the wrong one "
                f"(load_mnist with verify=True names a copy that is not the standard file), "
                "or both, and copy or download the file again."
            )
        if verify and digests[0] != MNIST_SHA256[base_name]:
            raise DataFileError(
                f"{' and '.join(map(str, copies))}: checksum mismatch, SHA-256 of the contents "
                f"is {digests[0]}, not the standard MNIST file's {MNIST_SHA256[base_name]}. "
                "Delete it and download it again (download=True), or pass verify=False to "
                "load modified MNIST files on purpose."
            )
    # Prefer a copy already in memory, else the plain one (nothing to inflate).
    path = next((p for p in copies if p in contents), copies[-1])
    return path, read(path)


def load_mnist_subset(*, normalize: str | None = "symmetric") -> ImageData:
    """
    Load the class-stratified MNIST subset shipped with the package.

    It holds 1,000 training and 200 test images per class (10,000 and 2,000 in all), drawn
    with a fixed seed by ``scripts/make_mnist_subset.py``. Files are checked against the
    SHA-256 sums in the shipped manifest. No network access and no external files are needed.

    Example::

        >>> mnist = load_mnist_subset(normalize="unit")
        >>> mnist.train_x.shape, mnist.test_y.bincount()
        (torch.Size([10000, 1, 28, 28]), tensor([200, 200, 200, 200, 200, 200, 200, 200, 200, 200]))

    :param normalize: as in :func:`load_mnist`.
    :raises DataFileError: if a shipped file is damaged.
    """
    normalize = _check_normalize(normalize)
    package_dir = _subset_dir()
    manifest = json.loads((package_dir / SUBSET_MANIFEST).read_text())
    tensors, paths = {}, {}
    for field, name in SUBSET_FILES.items():
        resource, entry = package_dir / name, manifest["files"][name]
        shape = entry["shape"]
        size = 4 + 4 * len(shape) + math.prod(shape)
        raw = decompress_capped(resource.read_bytes(), size, resource)
        if hashlib.sha256(raw).hexdigest() != entry["sha256_uncompressed"]:
            raise DataFileError(
                f"{resource}: checksum does not match {SUBSET_MANIFEST}; the installed package is "
                "damaged. Reinstall pyro_bc or rerun scripts/make_mnist_subset.py."
            )
        tensors[field], paths[field] = parse_idx(raw, resource), resource
    return _to_image_data(tensors, paths, normalize)


def _subset_dir():
    # importlib.resources also works when the package is installed as a zip.
    return resources.files("pyro_bc.datasets") / "data_files"


# ----------------------------------------------------------------------------
# Conversion


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


def _to_image_data(tensors: dict, paths: dict, normalize: str | None) -> ImageData:
    for split in ("train", "test"):
        images, labels = tensors[f"{split}_x"], tensors[f"{split}_y"]
        image_path, label_path = paths[f"{split}_x"], paths[f"{split}_y"]
        if images.dim() != 3 or images.shape[1:] != (28, 28) or labels.dim() != 1:
            raise DataFileError(
                f"{image_path} holds shape {tuple(images.shape)} and {label_path} shape "
                f"{tuple(labels.shape)}; expected (N, 28, 28) images and (N,) labels. Check that "
                "the image and label files are not swapped or from another data set."
            )
        if len(images) != len(labels):
            raise DataFileError(
                f"{image_path} holds {len(images)} images but {label_path} {len(labels)} "
                "labels. The files come from different data sets; replace them."
            )
        if len(labels) == 0:
            raise DataFileError(
                f"{image_path} and {label_path} hold no examples: the {split} split is empty. "
                "Replace them with the full MNIST files."
            )
        if int(labels.max()) > 9:
            bad = int((labels > 9).nonzero()[0, 0])
            raise DataFileError(
                f"{label_path}: label {int(labels[bad])} at index {bad}, MNIST has only 0..9. "
                "This is not an MNIST label file (or it is corrupt); replace it."
            )
    return ImageData(
        train_x=_to_float_images(tensors["train_x"], normalize),
        train_y=tensors["train_y"].long(),
        test_x=_to_float_images(tensors["test_x"], normalize),
        test_y=tensors["test_y"].long(),
    )
