"""
Epoch time of the training loader: ``DataLoader(TensorDataset)`` against ``TensorBatches``.

Both give the same batches in the same order (see ``pyro_bc.datasets.TensorBatches``); this
times one pass over the training images with nothing else to do, so it is the loader's own
cost per epoch. Also times ``RandomCropFlip`` on CIFAR-10-sized batches (random tensors).

Usage::

    python benchmarks/loader_speed.py [--data ../shared/data/mnist] [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from pyro_bc.datasets import RandomCropFlip, TensorBatches, load_mnist
from pyro_bc.files import write_atomically


def epoch_seconds(loader) -> float:
    started = time.perf_counter()
    for _x, _y in loader:
        pass
    return time.perf_counter() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--data", default="../shared/data/mnist", help="as load_mnist's source")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/loader-speed.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = load_mnist(args.data)
    x, y = data.train_x, data.train_y
    cifar_x = torch.randn(50_000, 3, 32, 32)
    cifar_y = torch.randint(0, 10, (50_000,))
    candidates = {
        "DataLoader(TensorDataset)": lambda: DataLoader(
            TensorDataset(x, y), args.batch_size, shuffle=True
        ),
        "TensorBatches": lambda: TensorBatches(x, y, args.batch_size, shuffle=True),
        "CIFAR-10 TensorBatches": lambda: TensorBatches(
            cifar_x, cifar_y, args.batch_size, shuffle=True
        ),
        "CIFAR-10 TensorBatches + RandomCropFlip": lambda: TensorBatches(
            cifar_x, cifar_y, args.batch_size, shuffle=True, transform=RandomCropFlip()
        ),
    }
    times = {name: [] for name in candidates}
    for _ in range(args.repeats):  # interleaved, so load changes hit every candidate
        for name, make in candidates.items():
            times[name].append(epoch_seconds(make()))
    result = {
        "data": str(args.data),
        "train_images": len(y),
        "batch_size": args.batch_size,
        "threads": args.threads,
        "repeats": args.repeats,
        "median_epoch_seconds": {name: statistics.median(t) for name, t in times.items()},
    }
    base = result["median_epoch_seconds"]
    result["speedup"] = base["DataLoader(TensorDataset)"] / base["TensorBatches"]
    write_atomically(args.out, (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
