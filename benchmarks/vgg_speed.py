"""Milliseconds per training step and peak memory of the Bayesian VGG-16 against its twin.

Two implementations of one training step at batch 128 on CIFAR-shaped random inputs
(3x32x32), measured in one run, interleaved, several repetitions each:

- ``bayesian``: ``VGG16`` with the group normal-Jeffreys prior, its ``StructuredGuide``, one
  :class:`pyro_bc.infer.TrainingStep` (``TraceMeanField_ELBO``, local reparameterization, Adam);
- ``deterministic``: ``VGG16.deterministic()`` (batch norm and cifar.torch's dropout) with
  cross-entropy and the same Adam.

Each repetition's ratio (bayesian over deterministic) is recorded beside the ratio of the
medians: on a loaded machine the per-repeat ratios show how much the load moved.

Peak memory of training: each implementation runs ``--steps`` steps in a fresh process. On CPU
that process reports how far its peak resident set size rose above what it held once built
(the interpreter, torch, pyro and the parameters), and that peak itself; on CUDA,
``torch.cuda.max_memory_allocated`` above what the built network held, and that peak itself.

Last, the time of one :func:`pyro_bc.compress` of the untrained Bayesian VGG-16 (on CPU, in
this process): the proved chain, the summaries, the thresholds, thinning with every
convolution's batch norm folded into it, and the bit widths.

    python benchmarks/vgg_speed.py --steps 3 --repeats 3 --threads 1
    python benchmarks/vgg_speed.py --device cuda --steps 20 --repeats 5

Writes ``benchmarks/results/vgg-speed.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
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
from pyro_bc.infer import TrainingStep, adam
from pyro_bc.models import VGG16
from pyro_bc.priors import GroupNormalJeffreys

#: training images of CIFAR-10: the likelihood's scale in the ELBO
DATASET_SIZE = 50_000


def build_bayesian(device, width):
    model = VGG16(prior=GroupNormalJeffreys(), dataset_size=DATASET_SIZE, width=width).to(device)
    guide = pyro_bc.StructuredGuide(model)
    step = TrainingStep(model, guide, lr=1e-3)
    model.train()
    return lambda x, y: step(x, y)[0]


def build_deterministic(device, width):
    net = VGG16.deterministic(width=width).to(device).train()
    optimizer = adam(net.parameters(), lr=1e-3)

    def step(x, y):
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


BUILDERS = {"bayesian": build_bayesian, "deterministic": build_deterministic}


def make_batch(batch_size, device):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, 32, 32, generator=generator)  # standardised pixels
    y = torch.randint(0, 10, (batch_size,), generator=generator)
    return x.to(device), y.to(device)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, batch, steps, warmup, device):
    """Milliseconds per step after ``warmup`` steps (allocator, first-step validation, the
    second step's trace of the loss): wall clock, and this process's CPU time (which other
    processes on a loaded machine inflate far less; on CUDA it is the host's share only)."""
    for _ in range(warmup):
        step(*batch)
    synchronize(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step(*batch)
    synchronize(device)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return 1000 * wall / steps, 1000 * cpu / steps


def peak_memory(step, batch, steps, device):
    """MiB of peak memory: its rise while ``steps`` steps run, and the peak itself."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for _ in range(steps):
            step(*batch)
        synchronize(device)
        after = torch.cuda.max_memory_allocated(device)
        return {
            "training_mib": (after - before) / 2**20,
            "process_peak_mib": after / 2**20,
            "measure": "torch.cuda.max_memory_allocated",
        }
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for _ in range(steps):
        step(*batch)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "training_mib": (after - before) / 1024,
        "process_peak_mib": after / 1024,
        "measure": "peak resident set size (ru_maxrss)",
    }


def measure_in_subprocess(name, args):
    """Runs :func:`peak_memory` for one implementation in a fresh interpreter."""
    command = [sys.executable, __file__, "--memory-of", name, "--steps", str(args.steps)]
    command += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    command += ["--device", args.device, "--width", str(args.width)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def time_compress(width):
    """Seconds of one ``pyro_bc.compress`` of an untrained Bayesian VGG-16, and what it gave."""
    model = VGG16(prior=GroupNormalJeffreys(), dataset_size=DATASET_SIZE, width=width).eval()
    guide = pyro_bc.StructuredGuide(model)
    started = time.perf_counter()
    compressed = pyro_bc.compress(guide)
    seconds = time.perf_counter() - started
    report = compressed.report
    return {
        "seconds": seconds,
        "weights": report.weights,
        "weights_kept": report.weights_kept,
        "batch_norms_left": sum(isinstance(m, torch.nn.BatchNorm2d) for m in compressed.modules()),
    }


def print_table(result):
    """The measurements of :func:`main` as a few lines of text."""
    medians, times, memory = (
        result["ms_per_step_median"],
        result["ms_per_step_all"],
        result["peak_memory_mib"],
    )
    print(
        f"VGG-16 (width {result['width']}), batch {result['batch_size']}, {result['device']}, "
        f"{result['threads']} thread(s), {result['steps_per_repeat']} steps x "
        f"{result['repeats']} repeats; load average {result['load_average_1min']['before']:.1f} "
        f"on {result['cpu_count']} CPUs"
    )
    print(
        f"{'':>14} {'ms/step (median)':>17}  {'all repeats':<22} {'CPU ms/step':>11}  "
        "peak memory while training"
    )
    for name, median in medians.items():
        m = memory[name]
        all_ms = ", ".join(f"{t:.0f}" for t in times[name])
        print(
            f"{name:>14} {median:17.0f}  {all_ms:<22} "
            f"{result['cpu_ms_per_step_median'][name]:11.0f}  +{m['training_mib']:.0f} MiB "
            f"(process peak {m['process_peak_mib']:.0f} MiB)"
        )
    ratios = ", ".join(f"{r:.2f}" for r in result["ratio_bayesian_to_deterministic_per_repeat"])
    print(
        f"bayesian / deterministic: {result['ratio_of_medians']:.2f} (ratio of medians); "
        f"per repeat {ratios}; of CPU times {result['cpu_time_ratio_of_medians']:.2f}"
    )
    c = result["compress_untrained"]
    print(
        f"compress (untrained, batch norms folded, CPU): {c['seconds']:.2f} s, "
        f"{c['weights_kept']:,} of {c['weights']:,} weights kept, "
        f"{c['batch_norms_left']} batch norms left"
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each repeat")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=64, help="VGG16 width (64 in the paper)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/vgg-speed.json")
    parser.add_argument("--memory-of", choices=sorted(BUILDERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("repeats", "steps", "batch_size", "width", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    device = torch.device(args.device)
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here (torch.cuda.is_available())")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    batch = make_batch(args.batch_size, device)
    if args.memory_of:
        step = BUILDERS[args.memory_of](device, args.width)
        print(json.dumps(peak_memory(step, batch, args.steps, device)))
        return
    load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    memory = {name: measure_in_subprocess(name, args) for name in BUILDERS}
    steps = {name: build(device, args.width) for name, build in BUILDERS.items()}
    times = {name: [] for name in BUILDERS}
    cpu_times = {name: [] for name in BUILDERS}
    for _ in range(args.repeats):  # interleaved, so load changes hit both implementations
        for name, step in steps.items():
            wall, cpu = time_steps(step, batch, args.steps, args.warmup, device)
            times[name].append(wall)
            cpu_times[name].append(cpu)
    medians = {name: statistics.median(t) for name, t in times.items()}
    cpu_medians = {name: statistics.median(t) for name, t in cpu_times.items()}
    ratios = [b / d for b, d in zip(times["bayesian"], times["deterministic"], strict=True)]
    del steps
    compress = time_compress(args.width)
    result = {
        "ms_per_step_median": medians,
        "ms_per_step_all": times,
        "cpu_ms_per_step_median": cpu_medians,
        "cpu_ms_per_step_all": cpu_times,
        "ratio_bayesian_to_deterministic_per_repeat": ratios,
        "ratio_of_medians": medians["bayesian"] / medians["deterministic"],
        "cpu_time_ratio_of_medians": cpu_medians["bayesian"] / cpu_medians["deterministic"],
        "peak_memory_mib": memory,
        "compress_untrained": compress,
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine()
        ),
        "batch_size": args.batch_size,
        "width": args.width,
        "steps_per_repeat": args.steps,
        "warmup_steps": args.warmup,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "command": " ".join(["python", "benchmarks/vgg_speed.py", *sys.argv[1:]]),
    }
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, json.dumps(result, indent=2).encode())


if __name__ == "__main__":
    main()
