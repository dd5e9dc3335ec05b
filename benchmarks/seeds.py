"""How far a row of the MNIST table moves with the seed: its recipe re-run with several seeds.

Each seed trains the row's recipe (initialisation, pretraining, SVI noise and data order all
follow it) under ``benchmarks/runs/<network>-<prior>-seed<N>/`` (seed 0 is ``reproduce.py``'s
run, ``benchmarks/runs/<network>-<prior>/``, and is resumed from there), then compresses it as
``reproduce.py`` does: within the recipe's validation budget, without and with retraining, then
refit on all training images where the recipe refits. Every choice is made on the validation
split; the test set is only reported.

    python benchmarks/seeds.py --network lenet300 --prior gnj --seeds 0 1 2 --data DIR

Prints one line per seed and the range over seeds, and writes
``benchmarks/results/<network>-<prior>-seeds.json``, keeping the seeds a file of the same recipe
already holds (seeds can be added by later runs). ``--summary`` only prints the file's summary.

The summary also says what the budget cost on each split: the chosen network's error (without
retraining) above the dense posterior mean's, on validation (where it was chosen to stay within
the budget) and on test. Choosing the smallest network within the budget favours candidates whose
validation error came out low by chance, so the test increase tends to be the larger.
"""

from __future__ import annotations

import argparse
import json
import statistics

import pyro
import torch
from reproduce import NAMES, RESULTS, VALIDATION, compress_row, report_point, train

from pyro_bc.datasets import load_mnist, train_test_loaders, train_validation_test_loaders
from pyro_bc.files import write_atomically
from pyro_bc.models import build, recipe


def run_seed(args, seed) -> dict:
    """One seed of the row: trained (or resumed) exactly as ``reproduce.py --seed`` trains it."""
    run = argparse.Namespace(**{**vars(args), "seed": seed})
    pyro.set_rng_seed(seed)
    r = recipe(args.network, args.prior)
    data = load_mnist(args.data)
    loaders = train_validation_test_loaders(data, validation=VALIDATION)
    network, model, guide = build(args.network, args.prior, len(loaders.train.dataset))
    train(run, r, loaders, model, guide, network)
    everything, _ = train_test_loaders(data, r.batch_size)
    row = compress_row(run, r, loaders, guide, r.max_error_increase, everything)
    return {
        "seed": seed,
        "dense_validation_error": row.without.dense_validation_error,
        "dense_test_error": row.dense["error"],
        "without_retraining": report_point(row.without),
        "with_retraining": None if row.retrained is None else report_point(row.retrained),
        "chosen": report_point(row.chosen.report),
        "kept": report_point(row.final.report),
        "minutes": row.minutes,
    }


def _range(values, scale=1.0, digits=2):
    return f"{min(values) * scale:.{digits}f}-{max(values) * scale:.{digits}f}"


def summary(network, prior, seeds) -> str:
    """Ranges over the seeds, and the budget's mean cost on validation and on test."""
    kept = [s["kept"] for s in seeds]
    validation = [
        s["without_retraining"]["validation_error"] - s["dense_validation_error"] for s in seeds
    ]
    test = [s["without_retraining"]["test_error"] - s["dense_test_error"] for s in seeds]
    return (
        f"{NAMES[network]} {NAMES[prior]}, seeds {[s['seed'] for s in seeds]}: after pruning "
        f"{_range([k['pruning_rate'] for k in kept], digits=1)}x, after precision "
        f"{_range([k['precision_rate'] for k in kept], digits=0)}x, test error "
        f"{_range([k['test_error'] for k in kept], 100)}% (dense "
        f"{_range([s['dense_test_error'] for s in seeds], 100)}%); without retraining, error "
        f"above the dense posterior mean: validation +{100 * statistics.mean(validation):.3f} "
        f"points on average ({_range(validation, 100)}), test +{100 * statistics.mean(test):.3f} "
        f"({_range(test, 100)})"
    )


def in_order(by_seed) -> list:
    """The seeds' results, lowest seed first."""
    return [by_seed[seed] for seed in sorted(by_seed)]


def write_seeds(path, network, prior, r, seeds) -> None:
    """The seeds run so far, with their recipe and the command that reproduces them."""
    result = {
        "network": NAMES[network],
        "prior": NAMES[prior],
        "recipe": r,
        "seeds": seeds,
        "command": f"python benchmarks/seeds.py --network {network} --prior {prior} "
        f"--seeds {' '.join(str(s['seed']) for s in seeds)}",
    }
    write_atomically(path, json.dumps(result, indent=2).encode())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", choices=["lenet300", "lenet5"], default="lenet300")
    parser.add_argument("--prior", choices=["gnj", "ghs"], default="gnj")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", default="../shared/data/mnist")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--summary", action="store_true", help="only print the file's summary")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = RESULTS / f"{args.network}-{args.prior}-seeds.json"
    # as JSON stores it (tuples become lists), so that an earlier file's recipe compares equal
    r = json.loads(json.dumps(recipe(args.network, args.prior).to_dict()))
    earlier = json.loads(path.read_text()) if path.exists() else {}
    by_seed = {s["seed"]: s for s in earlier.get("seeds", [])} if earlier.get("recipe") == r else {}
    if args.summary:
        if not by_seed:
            raise SystemExit(f"{path}: no seeds of the current recipe; run some with --seeds")
        print(summary(args.network, args.prior, in_order(by_seed)))
        return
    for seed in args.seeds:
        result = by_seed[seed] = run_seed(args, seed)
        kept = result["kept"]
        print(
            f"seed {seed}: dense {result['dense_validation_error']:.2%} validation, "
            f"{result['dense_test_error']:.2%} test; kept {kept['architecture']}, "
            f"{kept['pruning_rate']:.1f}x / {kept['precision_rate']:.0f}x, "
            f"chosen at {result['chosen']['validation_error']:.2%} validation, "
            f"{kept['test_error']:.2%} test",
            flush=True,
        )
        # after every seed, so that a session ended mid-list keeps the seeds it finished
        write_seeds(path, args.network, args.prior, r, in_order(by_seed))
    print(summary(args.network, args.prior, in_order(by_seed)))


if __name__ == "__main__":
    main()
