"""Inference time of a compressed network against the dense posterior-mean network, on CPU.

Three forward passes over the same inputs, at batch 1 and batch 1,000, measured interleaved
(several repetitions each, medians):

- ``compressed``: ``pyro_bc.compress(guide)``, the thinned, quantized ``nn.Sequential``;
- ``dense``: the same posterior means without pruning or rounding, as a plain ``nn.Sequential``
  (``compress(guide, thresholds=inf, bits=None)``): the fair baseline;
- ``pyro``: ``pyro_bc.predict_logits(model, guide, x)``, the posterior mean through Pyro's
  effect handlers (what evaluation during training costs).

With no ``--checkpoint`` it first trains a quick LeNet-300-100 (GNJ) on the MNIST subset shipped
in the package, so the script runs anywhere; such a short run prunes little, so its speed-up is
small. Point it at a real checkpoint of :func:`pyro_bc.fit` for the real figure:

    python benchmarks/inference_speed.py --checkpoint runs/lenet300-gnj-checkpoint.pt

Prints a table and writes ``<out>/inference-speed-<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import pyro
import torch

import pyro_bc
from pyro_bc.datasets import load_mnist, train_test_loaders
from pyro_bc.files import write_atomically
from pyro_bc.models import MODELS, PRIORS, build


def build_guide(args):
    """The guide of ``args.model`` / ``args.prior``: from the checkpoint, or trained briefly."""
    _, model, guide = build(args.model, args.prior, 60_000)
    if args.checkpoint:
        guide.load_state_dict(pyro_bc.load_checkpoint(args.checkpoint)["guide"])
        return model, guide, f"checkpoint {args.checkpoint}"
    data = load_mnist("subset")
    model.dataset_size = len(data.train_x)
    train_loader, _ = train_test_loaders(data, batch_size=128)
    pyro.set_rng_seed(args.seed)
    pyro_bc.fit(model, guide, train_loader, epochs=args.quick_epochs, lr=1e-2, progress=False)
    return model, guide, f"quick run: {args.quick_epochs} epochs on the shipped MNIST subset"


def median_seconds(fn, x, repeats):
    """Median wall time of ``fn(x)`` over ``repeats`` calls, after a few warm-up calls."""
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(candidates, input_shape, batch, repeats, rounds):
    """Medians per candidate; rounds interleave the candidates so drifts in load hit all alike."""
    x = torch.randn(batch, *input_shape)
    samples = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            samples[name].append(median_seconds(fn, x, repeats))
    return {name: statistics.median(values) for name, values in samples.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a checkpoint of pyro_bc.fit (default: quick run)")
    parser.add_argument("--model", choices=sorted(MODELS), default="lenet300")
    parser.add_argument("--prior", choices=sorted(PRIORS), default="gnj")
    parser.add_argument("--threshold", default=None, help="a number or 'auto' (default 'auto')")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats-batch1", type=int, default=200)
    parser.add_argument("--repeats-batch1000", type=int, default=10)
    parser.add_argument("--quick-epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, guide, source = build_guide(args)
    threshold = args.threshold
    if threshold not in (None, "auto"):
        threshold = float(threshold)
    compressed = pyro_bc.compress(guide, threshold)
    dense = pyro_bc.compress(guide, math.inf, bits=None)
    model.eval()
    candidates = {
        "compressed": compressed,
        "dense": dense,
        "pyro": lambda x: pyro_bc.predict_logits(model, guide, x),
    }
    results = {}
    for batch, repeats in ((1, args.repeats_batch1), (1000, args.repeats_batch1000)):
        seconds = measure(candidates, compressed.input_shape, batch, repeats, args.rounds)
        results[f"batch_{batch}"] = {
            "ms": {name: 1000 * s for name, s in seconds.items()},
            "speedup_vs_dense": seconds["dense"] / seconds["compressed"],
            "speedup_vs_pyro": seconds["pyro"] / seconds["compressed"],
        }

    report = compressed.report
    print(f"{args.model} ({args.prior}), {source}; {args.threads} thread(s)")
    print(f"architecture {report.architecture}, weights x{report.pruning_rate:.2f} fewer")
    print(f"{'batch':>6} {'compressed ms':>14} {'dense ms':>10} {'pyro ms':>10} {'vs dense':>9}")
    for key, r in results.items():
        ms = r["ms"]
        print(
            f"{key.split('_')[1]:>6} {ms['compressed']:>14.4f} {ms['dense']:>10.4f} "
            f"{ms['pyro']:>10.4f} {r['speedup_vs_dense']:>8.2f}x"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "model": args.model,
        "prior": args.prior,
        "source": source,
        "architecture": report.architecture,
        "pruning_rate": report.pruning_rate,
        "macs": report.macs,
        "macs_kept": report.macs_kept,
        "results": results,
        "rounds": args.rounds,
        "repeats": {"batch_1": args.repeats_batch1, "batch_1000": args.repeats_batch1000},
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
    }
    path = out / f"inference-speed-{args.model}.json"
    write_atomically(path, json.dumps(record, indent=2).encode())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
