"""
Build the MNIST subset shipped in ``pyro_bc/datasets/data_files/``.

The subset is class-balanced, not proportional to class frequencies: exactly
``--train-per-class`` training images (default 1,000, so 10,000 in all) and
``--test-per-class`` test images (default 200, so 2,000 in all) of each digit,
drawn without replacement from the standard MNIST train and test splits with
``numpy.random.default_rng(seed)``. Chosen images keep their original relative
order. Balanced classes make the subset's per-class accuracies directly
comparable and keep the smallest class (5) as well represented as the others.

Output, no pickle: the four subset files in the standard gzipped IDX format
(level 9, zero timestamp, so the bytes depend only on the data) plus
``mnist-subset.json``, a manifest with the SHA-256 of each file's uncompressed
contents, the seed and the per-class counts. ``pyro_bc.datasets.load_mnist_subset``
reads the files with the same IDX reader and checks them against the manifest.
Every file is written atomically.

Usage::

    python scripts/make_mnist_subset.py [MNIST_DIR] [--seed 0] [--out pyro_bc/datasets/data_files]

``MNIST_DIR`` defaults to ``../shared/data/mnist`` next to the repository root.
The source files are checked against the standard MNIST checksums first.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing the package

from pyro_bc.datasets import load_mnist, read_idx, write_idx  # noqa: E402
from pyro_bc.datasets.mnist import MNIST_SHA256, SUBSET_FILES, SUBSET_MANIFEST  # noqa: E402
from pyro_bc.files import write_atomically  # noqa: E402

DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "data" / "mnist"
DEFAULT_OUT = REPO_ROOT / "pyro_bc" / "datasets" / "data_files"
NUM_CLASSES = 10


def stratified_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``per_class`` indices of each class without replacement, in ascending order."""
    chosen = []
    for digit in range(NUM_CLASSES):
        candidates = np.flatnonzero(labels == digit)
        if len(candidates) < per_class:
            raise ValueError(f"only {len(candidates)} examples of digit {digit}, need {per_class}")
        chosen.append(rng.choice(candidates, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def to_uint8_images(images: torch.Tensor) -> torch.Tensor:
    # load_mnist(normalize=None) returns exact 0..255 floats, so this is lossless.
    return images.squeeze(1).to(torch.uint8)


def build_subset(source: Path, out: Path, seed: int, train_per_class: int, test_per_class: int):
    mnist = load_mnist(source, normalize=None, verify=True)
    rng = np.random.default_rng(seed)
    train_idx = stratified_indices(mnist.train_y.numpy(), train_per_class, rng)
    test_idx = stratified_indices(mnist.test_y.numpy(), test_per_class, rng)
    subset = {
        "train_x": to_uint8_images(mnist.train_x[train_idx]),
        "train_y": mnist.train_y[train_idx].to(torch.uint8),
        "test_x": to_uint8_images(mnist.test_x[test_idx]),
        "test_y": mnist.test_y[test_idx].to(torch.uint8),
    }

    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for field, name in SUBSET_FILES.items():
        path = out / name
        write_idx(path, subset[field])
        # Hash and re-read what actually landed on disk, not what we meant to write.
        if not torch.equal(read_idx(path), subset[field]):
            raise RuntimeError(f"{path}: round trip through write_idx/read_idx changed the data")
        files[name] = {
            "sha256_uncompressed": hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest(),
            "shape": list(subset[field].shape),
            "bytes": path.stat().st_size,
        }
    manifest = {
        "description": "Class-balanced MNIST subset for pyro_bc; see scripts/make_mnist_subset.py",
        "source_sha256_uncompressed": MNIST_SHA256,
        "seed": seed,
        "sampler": "numpy.random.default_rng(seed).choice per class, train then test",
        "train_per_class": train_per_class,
        "test_per_class": test_per_class,
        "files": files,
    }
    manifest_json = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    write_atomically(out / SUBSET_MANIFEST, manifest_json.encode())
    return files


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=200)
    args = parser.parse_args(argv)

    files = build_subset(
        args.source, args.out, args.seed, args.train_per_class, args.test_per_class
    )
    for name, info in files.items():
        print(f"{info['bytes']:>9,d}  {args.out / name}")
    print(f"{sum(info['bytes'] for info in files.values()):>9,d}  total")


if __name__ == "__main__":
    main()
