"""LeNet-300-100 with the group normal-Jeffreys prior on full MNIST: error, log alpha, ms/step.

Recipe: pretrain the deterministic twin (Adam, lr 1e-3) for ``--pretrain-epochs``, initialise the
guide's weight means from it, then train the guide with SVI (TraceMeanField_ELBO, local
reparameterization, Adam lr 1e-3, batch 128, fc1's weight variance clipped at 0.04 as in the
authors' code). Writes ``<out>/lenet300-gnj-train.json`` and ``<out>/lenet300-gnj-log-alpha.png``.

    python benchmarks/lenet300_gnj.py --data ../shared/data/mnist --epochs 100
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib
import pyro
import torch
from pyro_bc.models import LeNet300100

import pyro_bc
from pyro_bc.data import load, mnist_loaders
from pyro_bc.priors import GroupNormalJeffreys

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@torch.no_grad()
def plain_error(net, loader):
    wrong = sum((net(x).argmax(-1) != y).sum().item() for x, y in loader)
    return wrong / len(loader.dataset)


def log_alphas(model, guide):
    posteriors = guide.distributions()
    return {
        layer.site(): layer.prior.log_dropout_rate(layer.site(), layer.num_groups, posteriors)
        for layer in model.bayesian_layers()
    }


def ms_per_step(model, guide, loader, steps=50):
    elbo = pyro.infer.TraceMeanField_ELBO()
    optimizer = torch.optim.Adam(guide.parameters(), lr=1e-3)
    batches = iter(loader)
    x, y = next(batches)
    times = []
    with pyro.validation_enabled(False):
        for _ in range(steps):
            started = time.perf_counter()
            with pyro_bc.poutine.local_reparameterization():
                loss = elbo.differentiable_loss(model, guide, x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - started)
    times = sorted(times[5:])
    return 1000 * times[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/mnist")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=-3.0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    pyro.set_rng_seed(args.seed)

    data = load(args.data)
    train_loader, test_loader = mnist_loaders(data, batch_size=128)
    started = time.perf_counter()
    net = pyro_bc.infer.pretrain(
        LeNet300100.deterministic(), train_loader, epochs=args.pretrain_epochs, progress=False
    )
    pretrained_error = plain_error(net, test_loader)
    pretrain_minutes = (time.perf_counter() - started) / 60
    print(f"pretrained twin: test error {pretrained_error:.2%} in {pretrain_minutes:.1f} min")

    model = LeNet300100(prior=GroupNormalJeffreys(), dataset_size=len(data.train_x))
    guide = pyro_bc.StructuredGuide(model, clip_var={"fc1": 0.04})
    if args.pretrain_epochs > 0:
        guide.init_from(net)

    def report(epoch, record):
        kept = {k: int((v < args.threshold).sum()) for k, v in log_alphas(model, guide).items()}
        record["kept_groups"] = kept
        print(f"  kept groups at log alpha < {args.threshold}: {kept}", flush=True)

    started = time.perf_counter()
    history = pyro_bc.fit(
        model,
        guide,
        train_loader,
        epochs=args.epochs,
        test_loader=test_loader,
        callback=report,
        seed=args.seed,
        checkpoint=out / "lenet300-gnj-checkpoint.pt",
        resume=True,
        progress=False,
    )
    svi_minutes = (time.perf_counter() - started) / 60
    final = pyro_bc.evaluate(model, guide, test_loader, num_samples=10)
    step_ms = ms_per_step(model, guide, train_loader)

    alphas = log_alphas(model, guide)
    fig, axes = plt.subplots(1, len(alphas), figsize=(4 * len(alphas), 3))
    for ax, (name, values) in zip(axes, alphas.items(), strict=True):
        ax.hist(values.detach().numpy(), bins=60)
        ax.axvline(args.threshold, color="k", linestyle="--")
        ax.set_title(f"{name}: log alpha")
    fig.tight_layout()
    fig.savefig(out / "lenet300-gnj-log-alpha.png", dpi=100)

    result = {
        "network": "LeNet-300-100",
        "prior": "GNJ",
        "pretrain_epochs": args.pretrain_epochs,
        "pretrained_test_error": pretrained_error,
        "pretrain_minutes": pretrain_minutes,
        "svi_epochs": args.epochs,
        "svi_minutes_this_run": svi_minutes,
        "test_error_posterior_mean": final["error"],
        "test_error_mc10": final["error_mc"],
        "ms_per_step_batch128": step_ms,
        "threads": torch.get_num_threads(),
        "kept_groups": {k: int((v < args.threshold).sum()) for k, v in alphas.items()},
        "threshold": args.threshold,
        "history": history.epochs,
    }
    (out / "lenet300-gnj-train.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    main()
