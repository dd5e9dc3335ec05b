"""What the refit's SVI gives, measured on held-out data.

``reproduce.py`` refits the chosen network on all 60,000 training images, validation split
included, so nothing held out is left to check the refit on. Here the same refit (the recipe's
epochs and learning rate, the chosen network's groups and bit widths) trains on the 50,000
training images alone, and the validation split measures it: the network chosen within the
recipe's budget without retraining, before and after. Each row's posterior is read from its
run's checkpoint under ``benchmarks/runs/`` (``reproduce.py`` and ``seeds.py`` train them; a run
not trained to the end is skipped); nothing here reads the test set.

    python benchmarks/refit_heldout.py --rows lenet300-gnj lenet5-gnj --seeds 0 1 2 --data DIR

``--seeds`` takes the runs of ``seeds.py`` (``benchmarks/runs/<row>-seed<N>/``). Prints one line
per row and seed and writes ``benchmarks/results/refit-heldout.json`` (``--out`` for another
name), with the mean change per row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from reproduce import RESULTS, VALIDATION, run_dir

import pyro_bc
from pyro_bc.checkpoint import load_checkpoint
from pyro_bc.compression import refit
from pyro_bc.datasets import load_mnist, train_validation_test_loaders
from pyro_bc.files import write_atomically
from pyro_bc.models import build, recipe


def row(network_name, prior_name, data, seed=0) -> dict | None:
    """The row's chosen network without retraining, before and after a refit on the training
    split, with both validation errors; None where the run has not finished training."""
    r = recipe(network_name, prior_name)
    loaders = train_validation_test_loaders(data, validation=VALIDATION)
    _, model, guide = build(network_name, prior_name, len(loaders.train.dataset))
    checkpoint = run_dir(network_name, prior_name, seed) / "checkpoint.pt"
    if not checkpoint.exists():
        return None
    state = load_checkpoint(checkpoint, guide)
    if state["epoch"] < r.epochs:
        return None
    guide.load_state_dict(state["guide"])
    if state.get("model"):
        model.load_state_dict(state["model"])
    chosen = pyro_bc.compress(
        guide,
        calibration=loaders.train,
        validation=loaders.validation,
        max_error_increase=r.max_error_increase,
    )
    started = time.perf_counter()
    refitted, _ = refit(
        chosen, guide, loaders.train, epochs=r.refit_epochs, lr=r.retrain_lr, seed=seed
    )
    return {
        "row": f"{network_name}-{prior_name}",
        "seed": seed,
        "architecture": chosen.report.architecture,
        "pruning_rate": chosen.report.pruning_rate,
        "dense_validation_error": chosen.report.dense_validation_error,
        "chosen_validation_error": chosen.report.validation_error,
        "refit_validation_error": refitted.evaluate(loaders.validation)["error"],
        "refit_epochs": r.refit_epochs,
        "refit_examples": len(loaders.train.dataset),
        "refit_minutes": (time.perf_counter() - started) / 60,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows",
        nargs="+",
        default=["lenet300-gnj", "lenet300-ghs", "lenet5-gnj", "lenet5-ghs"],
        help="network-prior pairs (default: the four rows of the table)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--data", default="../shared/data/mnist")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="refit-heldout.json", help="file under results/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_mnist(args.data)
    results = []
    for name in args.rows:
        for seed in args.seeds:
            result = row(*name.split("-"), data, seed)
            if result is None:
                print(f"{name} seed {seed}: not trained to the end; skipped", flush=True)
                continue
            results.append(result)
            print(
                f"{name} seed {seed}: {result['architecture']}, {result['pruning_rate']:.1f}x; "
                f"validation error dense {result['dense_validation_error']:.2%}, chosen "
                f"{result['chosen_validation_error']:.2%}, after the refit on the training "
                f"split {result['refit_validation_error']:.2%} "
                f"({result['refit_minutes']:.1f} min)",
                flush=True,
            )
    summary = {}
    for name in args.rows:
        changes = [
            r["refit_validation_error"] - r["chosen_validation_error"]
            for r in results
            if r["row"] == name
        ]
        if not changes:
            continue
        summary[name] = {
            "mean_change": statistics.mean(changes),
            "lower": sum(c < 0 for c in changes),
            "higher": sum(c > 0 for c in changes),
            "seeds": len(changes),
        }
        print(
            f"{name}: the refit changed the validation error by "
            f"{100 * summary[name]['mean_change']:+.3f} points on average over {len(changes)} "
            f"seeds (lower {summary[name]['lower']}, higher {summary[name]['higher']})"
        )
    command = (
        f"python benchmarks/refit_heldout.py --rows {' '.join(args.rows)} "
        f"--seeds {' '.join(map(str, args.seeds))} --out {args.out}"
    )
    write_atomically(
        RESULTS / args.out,
        json.dumps({"rows": results, "summary": summary, "command": command}, indent=2).encode(),
    )


if __name__ == "__main__":
    main()
