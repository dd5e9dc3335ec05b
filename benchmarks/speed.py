"""Training speed of pyro_bc against the same math hand-written in PyTorch.

Four implementations of one training step at batch 128, for LeNet-300-100 and LeNet-5-Caffe
with the group normal-Jeffreys prior, measured in one run, interleaved, several repeats each:

- ``pyro_bc``: the library's own training step (:class:`pyro_bc.infer.TrainingStep`, what
  :func:`pyro_bc.fit` runs), its loss replayed from TorchScript traces (:mod:`pyro_bc.tracing`);
- ``pyro_bc untraced``: the same step with ``trace=False``, its Python run on every step;
- ``hand-written``: the same math in plain PyTorch (same initialisation, batch, optimizer, local
  reparameterization, closed-form KLs), written here as the reference to beat;
- ``deterministic``: a plain network of the same shape with cross-entropy (the floor).

Then one epoch end to end, data loading included, of LeNet-300-100 on full MNIST (``--mnist DIR``,
a directory with the four MNIST files) or, without it, on the shipped subset: ``pyro_bc.fit``
(traced and untraced) with the loader of :func:`pyro_bc.datasets.train_test_loaders`
(``TensorBatches``: one index batch per step), against a hand-written loop that indexes the
data tensors with the same shuffled index batches (the same seeded permutation in every
repeat, checked before timing). Each repeat is a fresh one-epoch ``fit``: its first step
(validated) and its traces are part of the epoch's time.

Every repeat runs each implementation once, so load from other processes hits all of them; the
ratios of pyro_bc and of pyro_bc untraced to hand-written are reported per repeat and as the
ratio of the medians, both for wall-clock time and for this process's CPU time (steadier on a
loaded machine).

It also measures the peak memory of training: each implementation runs ``--steps`` steps in a
fresh process, which reports how far its peak resident set size rose above what it held once
built (the interpreter, torch, pyro and the parameters), and that peak itself.

    python benchmarks/speed.py --threads 1 --repeats 7 --steps 50 --mnist DIR

Writes ``benchmarks/results/speed.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F

import pyro_bc
from pyro_bc.datasets import ImageData, load_mnist, train_test_loaders
from pyro_bc.files import write_atomically
from pyro_bc.infer import adam
from pyro_bc.models import LeNet5Caffe, LeNet300100
from pyro_bc.priors import GroupNormalJeffreys

K1, K2, K3 = 0.63576, 1.87320, 1.48695

#: per network: the model class, the fc1 variance clip, and the hand-written layers
#: ``(kind, weight shape, what follows)``
NETWORKS = {
    "lenet300": (
        LeNet300100,
        0.04,
        [
            ("linear", (300, 784), "relu"),
            ("linear", (100, 300), "relu"),
            ("linear", (10, 100), None),
        ],
    ),
    "lenet5": (
        LeNet5Caffe,
        None,
        [
            ("conv", (20, 1, 5, 5), "relu-pool"),
            ("conv", (50, 20, 5, 5), "relu-pool"),
            ("linear", (500, 800), "relu"),
            ("linear", (10, 500), None),
        ],
    ),
}
LOADERS = {
    "pyro_bc": "pyro_bc.fit over pyro_bc.datasets.train_test_loaders (TensorBatches)",
    "pyro_bc untraced": "the same, fit(..., trace=False)",
    "hand-written": "a loop over shuffled index batches of the data tensors (x[idx], y[idx])",
}


class HandWrittenGNJ(torch.nn.Module):
    """A network with the group normal-Jeffreys prior, trained as in the authors' code.

    Dense layers have one group scale per input, convolutions one per filter.
    """

    def __init__(self, layers, dataset_size, clip_var=None):
        super().__init__()
        self.layers = layers
        self.dataset_size = dataset_size
        self.max_log_var = None if clip_var is None else math.log(clip_var)
        for name in ("z_loc", "z_log_var", "w_loc", "w_log_var", "b_loc", "b_log_var"):
            setattr(self, name, torch.nn.ParameterList())
        for kind, shape, _ in layers:
            groups = shape[1] if kind == "linear" else shape[0]
            fan_in = math.prod(shape[1:])
            self.z_loc.append(torch.nn.Parameter(1 + 0.01 * torch.randn(groups)))
            self.z_log_var.append(torch.nn.Parameter(-9 + 0.01 * torch.randn(groups)))
            self.w_loc.append(torch.nn.Parameter(torch.randn(shape) / fan_in**0.5))
            self.w_log_var.append(torch.nn.Parameter(-9 + 0.01 * torch.randn(shape)))
            self.b_loc.append(torch.nn.Parameter(torch.zeros(shape[0])))
            self.b_log_var.append(torch.nn.Parameter(-9 + 0.01 * torch.randn(shape[0])))

    def _weight_log_var(self, i):
        log_var = self.w_log_var[i]
        clip = i == 0 and self.max_log_var is not None
        return log_var.clamp(max=self.max_log_var) if clip else log_var

    def loss(self, x, y):
        """Negative ELBO: scaled cross-entropy under local reparameterization plus the KLs."""
        kl = 0.0
        for i, (kind, _, then) in enumerate(self.layers):
            z_log_var, z_loc = self.z_log_var[i], self.z_loc[i]
            w_log_var, b_log_var = self._weight_log_var(i), self.b_log_var[i]
            w_var, b_var = w_log_var.exp(), b_log_var.exp()  # shared by outputs and KLs
            z = z_loc + (0.5 * z_log_var).exp() * torch.randn(x.shape[0], len(z_loc))
            if kind == "linear":
                x = x.flatten(1)
                xz = x * z
                mean = F.linear(xz, self.w_loc[i], self.b_loc[i])
                var = F.linear(xz.pow(2), w_var, b_var)
            else:
                z = z[..., None, None]
                mean = F.conv2d(x, self.w_loc[i], self.b_loc[i]) * z
                var = F.conv2d(x.pow(2), w_var, b_var) * z.pow(2)
            x = mean + var.clamp_min(1e-16).sqrt() * torch.randn_like(mean)
            if then is not None:
                x = F.relu(x)
            if then == "relu-pool":
                x = F.max_pool2d(x, 2)
            log_alpha = z_log_var - z_loc.pow(2).log()
            kl = (
                kl
                + (K1 * torch.sigmoid(-(K2 + K3 * log_alpha)) + 0.5 * F.softplus(-log_alpha)).sum()
            )
            for loc, log_var, v in (
                (self.w_loc[i], w_log_var, w_var),
                (self.b_loc[i], b_log_var, b_var),
            ):
                # each term summed on its own, as pyro_bc.distributions.kl_sum does
                kl = kl + 0.5 * (loc.pow(2).sum() + v.sum() - log_var.sum() - loc.numel())
        nll = F.cross_entropy(x, y, reduction="sum") * (self.dataset_size / len(y))
        return nll + kl


def build_pyro_bc(network, dataset_size):
    model_class, clip, _ = NETWORKS[network]
    model = model_class(prior=GroupNormalJeffreys(), dataset_size=dataset_size)
    guide = pyro_bc.StructuredGuide(model, clip_var=None if clip is None else {"fc1": clip})
    return model, guide


def step_pyro_bc(network, dataset_size, trace=True):
    model, guide = build_pyro_bc(network, dataset_size)
    step = pyro_bc.infer.TrainingStep(model, guide, lr=1e-3, trace=trace)
    return lambda x, y: step(x, y)[0]


def step_pyro_bc_untraced(network, dataset_size):
    return step_pyro_bc(network, dataset_size, trace=False)


def _torch_step(loss_fn, params):
    optimizer = adam(params, lr=1e-3)

    def step(x, y):
        loss = loss_fn(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


def step_hand_written(network, dataset_size):
    _, clip, layers = NETWORKS[network]
    net = HandWrittenGNJ(layers, dataset_size, clip)
    return _torch_step(net.loss, net.parameters())


def step_deterministic(network, dataset_size):
    net = NETWORKS[network][0].deterministic()
    return _torch_step(lambda x, y: F.cross_entropy(net(x), y), net.parameters())


#: the implementations whose ratio to the hand-written one is reported
COMPARED = ("pyro_bc", "pyro_bc untraced")
STEPS = {
    "pyro_bc": step_pyro_bc,
    "pyro_bc untraced": step_pyro_bc_untraced,
    "hand-written": step_hand_written,
    "deterministic": step_deterministic,
}


def time_steps(step, batch, steps):
    """Milliseconds per step: wall clock and this process's CPU time."""
    x, y = batch
    for _ in range(5):  # warm-up: allocator, first-step validation
        step(x, y)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step(x, y)
    return 1000 * (time.perf_counter() - wall) / steps, 1000 * (time.process_time() - cpu) / steps


def _epoch_generator(repeat):
    return torch.Generator().manual_seed(1_000 + repeat)


def epoch_pyro_bc(data, batch_size, trace=True):
    model, guide = build_pyro_bc("lenet300", len(data.train_x))

    def epoch(repeat):
        loader, _ = train_test_loaders(data, batch_size, generator=_epoch_generator(repeat))
        pyro_bc.fit(model, guide, loader, epochs=1, progress=False, trace=trace)

    return epoch


def hand_written_order(n, repeat):
    """The order of the examples that ``TensorBatches`` gives with the repeat's generator: it
    draws one number when an iterator is made, then ``randperm``."""
    generator = _epoch_generator(repeat)
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    return torch.randperm(n, generator=generator)


def epoch_hand_written(data, batch_size):
    _, clip, layers = NETWORKS["lenet300"]
    net = HandWrittenGNJ(layers, len(data.train_x), clip)
    step = _torch_step(net.loss, net.parameters())
    x, y = data.train_x, data.train_y

    def epoch(repeat):
        for idx in hand_written_order(len(x), repeat).split(batch_size):
            step(x[idx], y[idx])

    return epoch


def check_same_batches(n, batch_size):
    """Both epochs see the same index batches (the order of ``TensorBatches`` of the indices)."""
    indices = torch.arange(n)
    for repeat in (0, 1):
        loader, _ = train_test_loaders(
            ImageData(indices, indices, indices[:1], indices[:1]),
            batch_size,
            generator=_epoch_generator(repeat),
        )
        expected = torch.cat([idx for idx, _ in loader])
        if not torch.equal(expected, hand_written_order(n, repeat)):
            raise AssertionError("the hand-written epoch would not see pyro_bc's batches")


def time_call(fn, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def summarise(times, unit):
    """Per-implementation lists of ``(wall, cpu)`` -> medians, per-repeat values and ratios."""
    result = {}
    for clock, i in (("wall", 0), ("cpu", 1)):
        values = {name: [t[i] for t in ts] for name, ts in times.items()}
        medians = {name: statistics.median(v) for name, v in values.items()}
        result[clock] = {f"{unit}_all": values, f"{unit}_median": medians}
        for name in COMPARED:
            key = name.replace(" ", "_")
            result[clock][f"ratio_{key}_to_hand_written_per_repeat"] = [
                a / b for a, b in zip(values[name], values["hand-written"], strict=True)
            ]
            result[clock][f"ratio_{key}_to_hand_written_of_medians"] = (
                medians[name] / medians["hand-written"]
            )
    return result


def peak_memory(step, batch, steps):
    """MiB of peak resident memory: its rise while ``steps`` steps run, and the peak itself."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(steps):
        step(*batch)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"training_mib": (after - before) / 1024, "process_peak_mib": after / 1024}


def measure_in_subprocess(name, args):
    """Runs :func:`peak_memory` for one implementation in a fresh interpreter."""
    command = [sys.executable, __file__, "--memory-of", name, "--steps", str(args.steps)]
    command += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _print_ratios(label, summary, unit, scale=1.0):
    for clock in ("wall", "cpu"):
        s = summary[clock]
        medians = ", ".join(f"{n} {v * scale:.2f}" for n, v in s[f"{unit}_median"].items())
        print(f"{label} [{clock}] medians: {medians}")
        for name in COMPARED:
            key = name.replace(" ", "_")
            per_repeat = " ".join(f"{r:.3f}" for r in s[f"ratio_{key}_to_hand_written_per_repeat"])
            print(
                f"{label} [{clock}] {name} / hand-written: "
                f"{s[f'ratio_{key}_to_hand_written_of_medians']:.3f} of medians; per repeat: "
                f"{per_repeat}"
            )


def _without_paths(argv):
    """The command line with the MNIST directory written as DIR: a path of this machine's."""
    out = []
    for arg in argv:
        if out and out[-1] == "--mnist":
            arg = "DIR"
        elif arg.startswith("--mnist="):
            arg = "--mnist=DIR"
        out.append(arg)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--networks", default="lenet300,lenet5")
    parser.add_argument("--epoch-repeats", type=int, default=5, help="0 skips the epoch")
    parser.add_argument(
        "--mnist",
        metavar="DIR",
        help="the epoch on full MNIST from the four files in DIR (default: the shipped subset)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--out", default="benchmarks/results/speed.json")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # the subprocess's mode
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    batch = (
        torch.rand(args.batch_size, 1, 28, 28) * 2 - 1,
        torch.randint(0, 10, (args.batch_size,)),
    )
    if args.memory_of:
        step = STEPS[args.memory_of]("lenet300", 60_000)
        print(json.dumps(peak_memory(step, batch, args.steps)))
        return
    result = {"step": {}}
    if not args.no_memory:
        result["peak_memory_mib"] = {name: measure_in_subprocess(name, args) for name in STEPS}
    for network in args.networks.split(","):
        steps = {name: build(network, 60_000) for name, build in STEPS.items()}
        times = {name: [] for name in steps}
        for _ in range(args.repeats):  # interleaved, so load changes hit every implementation
            for name, step in steps.items():
                times[name].append(time_steps(step, batch, args.steps))
        summary = summarise(times, "ms_per_step")
        result["step"][f"{network}-gnj"] = summary
        _print_ratios(f"{network}-gnj step (ms)", summary, "ms_per_step")
    if args.epoch_repeats > 0:
        data = load_mnist(args.mnist or "subset")
        check_same_batches(len(data.train_x), args.batch_size)
        epochs = {
            "pyro_bc": epoch_pyro_bc(data, args.batch_size),
            "pyro_bc untraced": epoch_pyro_bc(data, args.batch_size, trace=False),
            "hand-written": epoch_hand_written(data, args.batch_size),
        }
        times = {name: [] for name in epochs}
        for repeat in range(args.epoch_repeats):
            for name, epoch in epochs.items():
                times[name].append(time_call(epoch, repeat))
        summary = summarise(times, "seconds")
        summary.update(
            loaders=LOADERS,
            data="full MNIST" if args.mnist else "the shipped MNIST subset",
            examples=len(data.train_x),
            network="lenet300-gnj",
        )
        result["epoch"] = summary
        _print_ratios("lenet300-gnj epoch (s)", summary, "seconds")
        for name, loader in LOADERS.items():
            print(f"  {name} loads with {loader}")
    result.update(
        batch_size=args.batch_size,
        steps_per_repeat=args.steps,
        repeats=args.repeats,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        pyro=pyro.__version__,
        machine=platform.processor() or platform.machine(),
        command=" ".join(["python", *_without_paths(sys.argv)]),
    )
    for name, m in result.get("peak_memory_mib", {}).items():
        print(
            f"{name:>14}: peak memory +{m['training_mib']:.1f} MiB while training "
            f"(process peak {m['process_peak_mib']:.0f} MiB)"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, json.dumps(result, indent=2).encode())


if __name__ == "__main__":
    main()
