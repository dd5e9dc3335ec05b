"""Speed-up of data-parallel training: one LeNet-5-Caffe (GNJ) epoch with 2 processes over 1.

Each repeat launches ``torchrun --nproc_per_node N`` for N = 1 and 2 (one thread per process,
gloo on CPU), trains one warm-up step, then times one epoch of ``pyro_bc.fit(...,
distributed=True)`` on the shipped MNIST subset at a global batch of 128 (each of N processes
gets 128 / N examples per step, so both runs do the same work per step). It prints each
repeat's ratio of epoch times; on a machine shared with other jobs the ratios scatter.

    python benchmarks/distributed_speed.py --repeats 3

Writes ``benchmarks/results/distributed_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import pyro_bc
from pyro_bc.datasets import load_mnist
from pyro_bc.files import write_atomically
from pyro_bc.models import LeNet5Caffe

RESULTS = Path(__file__).parent / "results"


def worker(args):
    torch.set_num_threads(1)
    pyro_bc.distributed.setup()
    data = load_mnist("subset")
    train = TensorDataset(data.train_x, data.train_y)
    torch.manual_seed(0)
    model = LeNet5Caffe(dataset_size=len(train))
    guide = pyro_bc.StructuredGuide(model)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)
    common = dict(progress=False, distributed=True, seed=0)
    pyro_bc.fit(model, guide, loader, epochs=1, max_steps=1, **common)  # warm-up
    history = pyro_bc.fit(model, guide, loader, epochs=1, max_steps=args.steps, **common)
    if pyro_bc.distributed.rank() == 0:
        print(json.dumps({"seconds": history["seconds"][-1]}), flush=True)
    pyro_bc.distributed.cleanup()


def launch(processes, args):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", str(processes), __file__, "--worker"]
    command += ["--batch-size", str(args.batch_size)]
    if args.steps is not None:
        command += ["--steps", str(args.steps)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["seconds"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch (default: all)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    for repeat in range(args.repeats):
        one, two = launch(1, args), launch(2, args)
        rows.append({"one_process_s": one, "two_processes_s": two, "speed_up": one / two})
        print(
            f"repeat {repeat + 1}: 1 process {one:.2f} s, 2 processes {two:.2f} s, "
            f"speed-up {one / two:.2f}",
            flush=True,
        )
    median = statistics.median(r["speed_up"] for r in rows)
    print(f"median speed-up {median:.2f} over {args.repeats} repeats")
    record = {
        "network": "LeNet-5-Caffe, GNJ, MNIST subset (10,000 examples)",
        "batch_size": args.batch_size,
        "steps": args.steps,
        "repeats": rows,
        "median_speed_up": median,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    RESULTS.mkdir(exist_ok=True)
    write_atomically(RESULTS / "distributed_speed.json", json.dumps(record, indent=2).encode())


if __name__ == "__main__":
    main()
