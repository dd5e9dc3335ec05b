"""Reproduce the paper's MNIST table: LeNet-300-100 and LeNet-5-Caffe, each with GNJ and GHS.

Recipe (every number below is an argument with this default):

- data: full MNIST (``--data``, default ``../shared/data/mnist``), inputs scaled to [-1, 1],
  batch 128;
- pretraining: the deterministic twin, Adam lr 1e-3, ``--pretrain-epochs`` (10); the guide's
  weight means start from it (``StructuredGuide.init_from``), as in the paper's "compress a
  trained network" workflow;
- SVI: ``pyro_bc.fit`` (TraceMeanField_ELBO with closed-form KLs, local reparameterization),
  Adam lr 1e-3, ``--epochs`` (250 for LeNet-300-100, 100 for LeNet-5-Caffe), the learning rate
  decaying linearly to 0 over the last ``--decay-epochs`` (50 and 20); LeNet-300-100's fc1
  weight variances clipped at 0.04 as in the authors' code (``pyro_bc.cli.CLIP_VAR``); the
  horseshoe with tau0 = 1e-5, its group scales starting at the trained weights' RMS per group
  (``init_from(..., rescale=True)``, ``--rescale``);
- compression: ``pyro_bc.compress``, pruned inputs replaced by their means over the training
  set (``calibration``), with ``--thresholds`` and the paper's bit-width rule. Thresholds: the
  authors' -2.8, -3, -5 for LeNet-300-100 with GNJ, -3 (the paper's usual value) for LeNet-5
  with GNJ, where the valley of the histogram keeps groups still on their way out when training
  stops; "auto" (each layer's valley) for the horseshoe, whose pruning quantity is bounded
  (``GroupHorseshoe.mode_separation``), so that a fixed -3 cuts into the kept mode.

Each run writes ``benchmarks/results/<network>-<prior>.json``, its figures, and a checkpoint under
``benchmarks/runs/`` (resumed if present); ``benchmarks/results/table.md`` is rebuilt from all
result files beside PAPER.md's numbers.

    python benchmarks/reproduce.py --network lenet300 --prior gnj
    python benchmarks/reproduce.py --table          # only rebuild the table
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import pyro
import torch

import pyro_bc
from pyro_bc.cli import parse_thresholds
from pyro_bc.datasets import load_mnist, train_test_loaders
from pyro_bc.files import write_atomically
from pyro_bc.models import build, recipe

RESULTS = Path(__file__).parent / "results"
RUNS = Path(__file__).parent / "runs"

#: PAPER.md's rows: error %, after pruning, after precision, pruned architecture
PAPER = {
    ("lenet300", "gnj"): (1.8, 9.3, None, "278-98-13"),
    ("lenet300", "ghs"): (1.8, 9.5, None, "311-86-14"),
    ("lenet5", "gnj"): (1.0, 108, 361, "8-13-88-13"),
    ("lenet5", "ghs"): (1.0, 156, 419, "5-10-76-16"),
}
DEFAULT_EPOCHS = {"lenet300": 250, "lenet5": 100}
DEFAULT_DECAY_EPOCHS = {"lenet300": 50, "lenet5": 20}
#: the authors' LeNet-300-100 thresholds for GNJ, -3 for GNJ elsewhere, the histogram's valley for
#: the horseshoe, whose pruned mode lies a few units above the kept one (at -3 it cuts into it)
DEFAULT_THRESHOLDS = {
    ("lenet300", "gnj"): "fc1=-2.8,fc2=-3,fc3=-5",
    ("lenet5", "gnj"): "-3",
    ("lenet300", "ghs"): "auto",
    ("lenet5", "ghs"): "auto",
}
NAMES = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5-Caffe", "gnj": "GNJ", "ghs": "GHS"}


def kept_groups(model, guide, thresholds):
    """Groups below a fixed threshold per layer, recorded every epoch for the training curves."""
    posteriors = guide.distributions()
    return {
        layer.site(): int(
            (layer.prior.log_dropout_rate(layer.site(), layer.num_groups, posteriors) < thresholds)
            .sum()
            .item()
        )
        for layer in model.bayesian_layers()
    }


def reproduce(args):
    pyro.set_rng_seed(args.seed)
    torch.set_num_threads(args.threads)
    epochs = args.epochs or DEFAULT_EPOCHS[args.network]
    if args.rescale is None:
        args.rescale = recipe(args.network, args.prior).rescale
    decay = DEFAULT_DECAY_EPOCHS[args.network] if args.decay_epochs is None else args.decay_epochs
    schedule = pyro_bc.infer.linear_decay(epochs - decay, epochs) if decay > 0 else None
    run_dir = RUNS / f"{args.network}-{args.prior}"
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = run_dir / "checkpoint.pt"

    data = load_mnist(args.data)
    train_loader, test_loader = train_test_loaders(data, batch_size=128)
    network, model, guide = build(args.network, args.prior, len(data.train_x))
    started = time.perf_counter()
    pretrained_error = None
    if args.pretrain_epochs > 0 and not checkpoint.exists():
        twin = pyro_bc.infer.pretrain(
            network.deterministic(), train_loader, epochs=args.pretrain_epochs, progress=False
        )
        with torch.no_grad():
            wrong = sum((twin(x).argmax(-1) != y).sum().item() for x, y in test_loader)
        pretrained_error = wrong / len(data.test_x)
        guide.init_from(twin, rescale=args.rescale)
        print(f"pretrained twin: test error {pretrained_error:.2%}", flush=True)
    pretrain_seconds = time.perf_counter() - started
    if checkpoint.exists():  # a resumed run: the pretraining happened in the first invocation
        pretrained_error = pyro_bc.load_checkpoint(checkpoint)["metadata"].get(
            "pretrained_test_error"
        )

    def log(epoch, record):
        record["kept_groups"] = kept_groups(model, guide, -3.0)
        print(
            f"epoch {epoch}: loss {record['loss']:.5g}, test error {record['test_error']:.2%}, "
            f"kept at -3: {record['kept_groups']}, {record['seconds']:.1f} s",
            flush=True,
        )

    started = time.perf_counter()
    history = pyro_bc.fit(
        model,
        guide,
        train_loader,
        epochs=epochs,
        test_loader=test_loader,
        callback=log,
        checkpoint=checkpoint,
        resume=True,
        seed=args.seed,
        progress=False,
        lr_schedule=schedule,
        metadata={
            "model": args.network,
            "prior": args.prior,
            "dataset_size": len(data.train_x),
            "pretrained_test_error": pretrained_error,
        },
    )
    svi_seconds = time.perf_counter() - started
    dense = pyro_bc.evaluate(model, guide, test_loader, num_samples=10)
    if args.thresholds is None:
        args.thresholds = DEFAULT_THRESHOLDS[args.network, args.prior]
    thresholds = parse_thresholds(args.thresholds)
    compressed = pyro_bc.compress(
        guide, thresholds=thresholds, test_loader=test_loader, calibration=train_loader
    )
    name = f"{args.network}-{args.prior}"
    compressed.save(run_dir / f"{name}.bc")
    report = compressed.report
    print(report)
    from pyro_bc import plots

    plots.pruning_histograms(guide, thresholds=thresholds, path=RESULTS / f"{name}-pruning.png")
    plots.weight_matrices(guide, compressed, path=RESULTS / f"{name}-weights.png")
    plots.training_curves(history, path=RESULTS / f"{name}-training.png")

    result = {
        "network": NAMES[args.network],
        "prior": NAMES[args.prior],
        "recipe": {
            "pretrain_epochs": args.pretrain_epochs,
            "rescale": args.rescale,
            "svi_epochs": len(history),
            "lr": 1e-3,
            "lr_decay_epochs": decay,
            "batch_size": 128,
            "thresholds": args.thresholds,
            "seed": args.seed,
        },
        "pretrained_test_error": pretrained_error,
        "minutes": {
            "pretraining": pretrain_seconds / 60,
            "svi_this_invocation": svi_seconds / 60,
            "svi_all_epochs": sum(r["seconds"] for r in history.epochs) / 60,
        },
        "test_error_dense_posterior_mean": dense["error"],
        "test_error_dense_mc10": dense["error_mc"],
        "report": report.to_dict(),
        "machine": {
            "threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
        },
        "command": f"python benchmarks/reproduce.py --network {args.network} --prior {args.prior}"
        f" --epochs {epochs} --decay-epochs {decay} --thresholds {args.thresholds}",
        "history": history.epochs,
    }
    write_atomically(RESULTS / f"{name}.json", json.dumps(result, indent=2).encode())
    write_table()


def write_table():
    """Rebuilds results/table.md from every result file, beside PAPER.md's numbers."""
    rows = [
        "| network | prior | error % (paper) | after pruning (paper) | after precision (paper) "
        "| file rate | architecture (paper) | epochs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (network, prior), (error, pruning, precision, arch) in PAPER.items():
        path = RESULTS / f"{network}-{prior}.json"
        if not path.exists():
            rows.append(f"| {NAMES[network]} | {NAMES[prior]} | not run | | | | | |")
            continue
        result = json.loads(path.read_text())
        r = result["report"]
        paper_precision = "not confirmed" if precision is None else f"{precision}"
        rows.append(
            f"| {NAMES[network]} | {NAMES[prior]} | {100 * r['test_error']:.2f} ({error}) "
            f"| {r['pruning_rate']:.1f} ({pruning}) | {r['precision_rate']:.0f} "
            f"({paper_precision}) | {r['file_rate']:.0f} "
            f"| {r['architecture'].split(' -> ')[-1]} ({arch}) "
            f"| {result['recipe']['svi_epochs']} |"
        )
    write_atomically(RESULTS / "table.md", ("\n".join(rows) + "\n").encode())
    print("\n".join(rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", choices=["lenet300", "lenet5"], default="lenet300")
    parser.add_argument("--prior", choices=["gnj", "ghs"], default="gnj")
    parser.add_argument("--data", default="../shared/data/mnist")
    parser.add_argument("--epochs", type=int, help="SVI epochs (default per network)")
    parser.add_argument(
        "--decay-epochs", type=int, help="linear decay of the learning rate to 0 over these last"
    )
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--thresholds", help="'auto', a number or LAYER=VALUE pairs")
    parser.add_argument(
        "--rescale",
        action=argparse.BooleanOptionalAction,
        help="start the group scales at the trained weights' RMS (default: with GHS only)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table", action="store_true", help="only rebuild results/table.md")
    args = parser.parse_args()
    if args.table:
        write_table()
    else:
        reproduce(args)


if __name__ == "__main__":
    main()
