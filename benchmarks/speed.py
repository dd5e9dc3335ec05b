"""Milliseconds per training step of LeNet-300-100 with the group normal-Jeffreys prior.

Three implementations of one step at batch 128, measured in one run, interleaved, several
repetitions each (medians):

- ``pyro_bc``: the library's own training step, as :func:`pyro_bc.fit` runs it;
- ``hand-written``: the same math in plain PyTorch (same initialisation, batch, optimizer, local
  reparameterization, closed-form KLs), written here as the reference to beat;
- ``deterministic``: a plain 784-300-100-10 network with cross-entropy (the floor).

It also measures the peak memory of training: each implementation runs ``--steps`` steps in a
fresh process, which reports how far its peak resident set size rose above what it held once
built (the interpreter, torch, pyro and the parameters), and that peak itself.

    python benchmarks/speed.py --repeats 7 --steps 50

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
from pyro_bc.files import write_atomically
from pyro_bc.infer import adam
from pyro_bc.models import LeNet300100
from pyro_bc.priors import GroupNormalJeffreys

K1, K2, K3 = 0.63576, 1.87320, 1.48695
SIZES = [(784, 300), (300, 100), (100, 10)]


class HandWrittenGNJ(torch.nn.Module):
    """LeNet-300-100 with the group normal-Jeffreys prior, trained as in the authors' code."""

    def __init__(self, dataset_size, clip_var=0.04):
        super().__init__()
        self.dataset_size = dataset_size
        self.max_log_var = math.log(clip_var)
        self.z_loc = torch.nn.ParameterList()
        self.z_log_var = torch.nn.ParameterList()
        self.w_loc = torch.nn.ParameterList()
        self.w_log_var = torch.nn.ParameterList()
        self.b_loc = torch.nn.ParameterList()
        self.b_log_var = torch.nn.ParameterList()
        for fan_in, fan_out in SIZES:
            self.z_loc.append(torch.nn.Parameter(1 + 0.01 * torch.randn(fan_in)))
            self.z_log_var.append(torch.nn.Parameter(-9 + 0.01 * torch.randn(fan_in)))
            self.w_loc.append(torch.nn.Parameter(torch.randn(fan_out, fan_in) / fan_in**0.5))
            self.w_log_var.append(torch.nn.Parameter(-9 + 0.01 * torch.randn(fan_out, fan_in)))
            self.b_loc.append(torch.nn.Parameter(torch.zeros(fan_out)))
            self.b_log_var.append(torch.nn.Parameter(-9 + 0.01 * torch.randn(fan_out)))

    def _weight_log_var(self, i):
        log_var = self.w_log_var[i]
        return log_var.clamp(max=self.max_log_var) if i == 0 else log_var

    def loss(self, x, y):
        """Negative ELBO: scaled cross-entropy under local reparameterization plus the KLs."""
        x = x.flatten(1)
        kl = 0.0
        for i in range(len(SIZES)):
            z_log_var, z_loc = self.z_log_var[i], self.z_loc[i]
            w_log_var, b_log_var = self._weight_log_var(i), self.b_log_var[i]
            w_var, b_var = w_log_var.exp(), b_log_var.exp()  # shared by outputs and KLs
            z = z_loc + (0.5 * z_log_var).exp() * torch.randn(x.shape[0], SIZES[i][0])
            xz = x * z
            mean = F.linear(xz, self.w_loc[i], self.b_loc[i])
            var = F.linear(xz.pow(2), w_var, b_var)
            x = mean + var.clamp_min(1e-16).sqrt() * torch.randn_like(mean)
            if i < len(SIZES) - 1:
                x = F.relu(x)
            log_alpha = z_log_var - z_loc.pow(2).log()
            kl = (
                kl
                + (K1 * torch.sigmoid(-(K2 + K3 * log_alpha)) + 0.5 * F.softplus(-log_alpha)).sum()
            )
            for loc, log_var, v in (
                (self.w_loc[i], w_log_var, w_var),
                (self.b_loc[i], b_log_var, b_var),
            ):
                kl = kl + 0.5 * (loc.pow(2) + v - 1 - log_var).sum()
        nll = F.cross_entropy(x, y, reduction="sum") * (self.dataset_size / len(y))
        return nll + kl


def step_pyro_bc(batch, dataset_size):
    model = LeNet300100(prior=GroupNormalJeffreys(), dataset_size=dataset_size)
    guide = pyro_bc.StructuredGuide(model, clip_var={"fc1": 0.04})
    step = pyro_bc.infer.TrainingStep(model, guide, lr=1e-3)
    return (lambda x, y: step(x, y)[0]), batch


def step_hand_written(batch, dataset_size):
    net = HandWrittenGNJ(dataset_size)
    optimizer = adam(net.parameters(), lr=1e-3)

    def step(x, y):
        loss = net.loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step, batch


def step_deterministic(batch, dataset_size):
    net = LeNet300100.deterministic()
    optimizer = adam(net.parameters(), lr=1e-3)

    def step(x, y):
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step, batch


def time_steps(step, batch, steps):
    x, y = batch
    for _ in range(5):  # warm-up: allocator, first-step validation
        step(x, y)
    started = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    return 1000 * (time.perf_counter() - started) / steps


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/speed.json")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # the subprocess's mode
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    batch = (
        torch.rand(args.batch_size, 1, 28, 28) * 2 - 1,
        torch.randint(0, 10, (args.batch_size,)),
    )
    builders = {
        "pyro_bc": step_pyro_bc,
        "hand-written": step_hand_written,
        "deterministic": step_deterministic,
    }
    if args.memory_of:
        step, b = builders[args.memory_of](batch, 60_000)
        print(json.dumps(peak_memory(step, b, args.steps)))
        return
    memory = {name: measure_in_subprocess(name, args) for name in builders}
    steps = {name: build(batch, 60_000) for name, build in builders.items()}
    times = {name: [] for name in builders}
    for _ in range(args.repeats):  # interleaved, so load changes hit every implementation
        for name, (step, b) in steps.items():
            times[name].append(time_steps(step, b, args.steps))
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "ms_per_step_median": medians,
        "ms_per_step_all": times,
        "ratio_pyro_bc_to_hand_written": medians["pyro_bc"] / medians["hand-written"],
        "ratio_hand_written_to_deterministic": medians["hand-written"] / medians["deterministic"],
        "peak_memory_mib": memory,
        "batch_size": args.batch_size,
        "steps_per_repeat": args.steps,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    for name, median in medians.items():
        print(f"{name:>14}: {median:7.2f} ms/step (median of {args.repeats})")
    print(f"pyro_bc / hand-written: {result['ratio_pyro_bc_to_hand_written']:.2f}")
    print(f"hand-written / deterministic: {result['ratio_hand_written_to_deterministic']:.2f}")
    for name, m in memory.items():
        print(
            f"{name:>14}: peak memory +{m['training_mib']:.1f} MiB while training "
            f"(process peak {m['process_peak_mib']:.0f} MiB)"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, json.dumps(result, indent=2).encode())


if __name__ == "__main__":
    main()
