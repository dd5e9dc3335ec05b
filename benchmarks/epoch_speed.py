"""Seconds per epoch of ``pyro_bc.fit`` on full MNIST, traced and untraced, on one device.

Each row trains its recipe's network, prior, learning rate and batch size on the 50,000 training
images ``reproduce.py`` trains on, for ``--epochs`` epochs from the same seed, once traced and
once untraced (``trace=False``) per repeat, the two interleaved. The first epoch (which validates
the model and, traced, records the trace) is reported apart from the later ones. Prints the median
seconds per later epoch, the ratio untraced / traced per repeat, and the minutes the recipe's SVI
epochs would take at that pace; writes ``benchmarks/results/epoch-speed-<device type>.json``.

    python benchmarks/epoch_speed.py --device cuda --data DIR
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import pyro
import torch
from reproduce import NAMES, RESULTS, VALIDATION

import pyro_bc
from pyro_bc.datasets import load_mnist, train_validation_test_loaders
from pyro_bc.files import write_atomically
from pyro_bc.models import build, recipe

MODES = {"traced": True, "untraced": False}


def epoch_seconds(row, loaders, device, epochs, trace) -> list:
    """Seconds of each epoch of a fresh run of the row's recipe."""
    network_name, prior_name = row
    r = recipe(network_name, prior_name)
    pyro.set_rng_seed(0)
    _, model, guide = build(network_name, prior_name, len(loaders.train.dataset), device=device)
    history = pyro_bc.fit(
        model, guide, loaders.train, epochs=epochs, lr=r.lr, seed=0, progress=False, trace=trace
    )
    return list(history["seconds"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--data", default="../shared/data/mnist")
    parser.add_argument("--rows", default="lenet300-gnj,lenet5-gnj,lenet5-ghs")
    parser.add_argument("--epochs", type=int, default=3, help="per run, the first included")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--out", help="default benchmarks/results/epoch-speed-<device type>.json")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is reported apart")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    loaders = train_validation_test_loaders(load_mnist(args.data), validation=VALIDATION)
    rows = [tuple(row.split("-")) for row in args.rows.split(",")]
    results = []
    for row in rows:
        runs = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode, trace in MODES.items():
                runs[mode].append(epoch_seconds(row, loaders, device, args.epochs, trace))
        later = {mode: [s for run in runs[mode] for s in run[1:]] for mode in MODES}
        median = {mode: statistics.median(later[mode]) for mode in MODES}
        ratios = [
            statistics.median(untraced[1:]) / statistics.median(traced[1:])
            for traced, untraced in zip(runs["traced"], runs["untraced"], strict=True)
        ]
        svi_epochs = recipe(*row).epochs
        name = f"{NAMES[row[0]]} {NAMES[row[1]]}"
        ratio = median["untraced"] / median["traced"]
        print(
            f"{name} on {device}: {median['traced']:.2f} s per epoch traced, "
            f"{median['untraced']:.2f} s untraced (ratio {ratio:.2f}, "
            f"per repeat {', '.join(f'{r:.2f}' for r in ratios)}); first epoch "
            f"{statistics.median(run[0] for run in runs['traced']):.2f} s traced; the recipe's "
            f"{svi_epochs} epochs: {svi_epochs * median['traced'] / 60:.1f} min",
            flush=True,
        )
        results.append(
            {
                "row": name,
                "seconds_per_epoch": median,
                "untraced_over_traced": ratio,
                "untraced_over_traced_per_repeat": ratios,
                "epoch_seconds": runs,
                "recipe_epochs": svi_epochs,
                "recipe_minutes_traced": svi_epochs * median["traced"] / 60,
            }
        )
    machine = {"processor": platform.machine(), "torch": torch.__version__, "threads": args.threads}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    out = Path(args.out) if args.out else RESULTS / f"epoch-speed-{device.type}.json"
    command = f"python benchmarks/epoch_speed.py --device {args.device} --rows {args.rows} "
    command += f"--epochs {args.epochs} --repeats {args.repeats}"
    result = {"machine": machine, "command": command, "rows": results}
    write_atomically(out, json.dumps(result, indent=2).encode())


if __name__ == "__main__":
    main()
