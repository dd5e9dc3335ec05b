"""The adversarial campaign against pyro_bc's readers and writers, re-run as one script.

Families: mutated ``.bc`` files (bytes, and header edits re-signed or not), mutated and edited
checkpoints, broken MNIST folders, bombs (a valid ``.bc`` of 1-bit weights, a gzip that inflates
to 2 GB, a zip-compressed checkpoint) with the whole process's peak memory, ``kill -9`` of a
checkpointing fit then resumed (compared bit for bit with an uninterrupted run), and compress on
the three non-chain shapes. Prints a table and writes ``benchmarks/results/adversarial.json``.

A "clear error" is the documented error of the reader (``CompressedFileError``,
``CheckpointError``, ``DataFileError``, or ``FileNotFoundError`` for a missing file) naming the
file; "other exceptions" anything else; "silent differences" a read that succeeded with a
result different from the original (files not re-signed) or unusable (re-signed edits).

Example::

    OMP_NUM_THREADS=1 python benchmarks/adversarial.py --scale 1
"""

from __future__ import annotations

import argparse
import copy
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import OrderedDict
from pathlib import Path

import pyro
import torch
from torch import nn

import pyro_bc
from pyro_bc.checkpoint import CheckpointError, _digest, load_checkpoint, restore_rng_state
from pyro_bc.codec import CompressedFileError
from pyro_bc.compressed import CompressedNetwork
from pyro_bc.datasets import DataFileError, load_mnist, write_idx
from pyro_bc.datasets import mnist as mnist_files
from pyro_bc.datasets.loaders import TensorBatches
from pyro_bc.gather import Gather
from pyro_bc.nn import BayesianLinear, BayesianNetwork

RESULTS = Path(__file__).resolve().parent / "results" / "adversarial.json"
HOSTILE = [0, 1, -1, 3, 2**31, 2**63, -(2**63), 2**70, None, True, 0.5, "", "x", [], [1], [0, 0],
           [2**31, 1], {}, {"a": 1}, "U8", "F32", "same"]  # fmt: skip


def mutate(raw: bytes, rng: random.Random) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 3)):
        kind, at = rng.choice("ftdiua"), rng.randrange(max(len(data), 1))
        if kind == "f" and data:
            data[at] ^= 1 << rng.randrange(8)
        elif kind == "t":
            del data[at:]
        elif kind == "d":
            del data[at : at + rng.randint(1, 64)]
        elif kind == "i":
            data[at:at] = rng.randbytes(rng.randint(1, 32))
        elif kind == "u":
            data[at:at] = data[at : at + rng.randint(1, 64)]
        else:
            data += rng.randbytes(rng.randint(1, 32))
    return bytes(data)


class Tally:
    def __init__(self):
        self.tried = self.clear = self.other = self.silent = self.same = self.accepted = 0
        self.examples = []

    def record(self, outcome, detail=""):
        self.tried += 1
        setattr(self, outcome, getattr(self, outcome) + 1)
        if outcome in ("other", "silent") and len(self.examples) < 5:
            self.examples.append(detail[:300])

    def row(self):
        return {
            k: getattr(self, k)
            for k in ("tried", "clear", "same", "accepted", "other", "silent", "examples")
        }


# ----------------------------------------------------------------------------
# .bc files


def bc_network():
    g = torch.Generator().manual_seed(0)
    conv, fc1, fc2 = nn.Conv2d(1, 3, 3, padding=1), nn.Linear(20, 6), nn.Linear(6, 3, bias=False)
    with torch.no_grad():
        for layer, t in ((conv, 3), (fc1, 5)):
            layer.weight.copy_(
                torch.round(torch.randn(layer.weight.shape, generator=g) * 2**t) / 2**t
            )
    layers = OrderedDict(
        conv=conv, relu=nn.ReLU(), pool=nn.MaxPool2d(2), avg=nn.AvgPool2d(1), flatten=nn.Flatten(),
        tanh=nn.Tanh(), fc1_gather=Gather(torch.arange(27)[torch.arange(27) % 4 != 1][:20], 27),
        fc1=fc1, act=nn.LeakyReLU(0.2), fc2=fc2,
    )  # fmt: skip
    return CompressedNetwork(
        layers, input_shape=(1, 6, 6), formats={"conv": 3, "fc1": 5, "fc2": None}
    )


def edit_bc_header(raw, rng):
    size = int.from_bytes(raw[:8], "little")
    header, buffer = json.loads(raw[8 : 8 + size]), raw[8 + size :]
    network = json.loads(header["__metadata__"]["network"])
    modules = network["modules"]
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["field", "tensor", "input", "modules", "metadata", "data"])
        if kind == "field":
            module = rng.choice(modules)
            module[rng.choice(sorted(module) + ["extra"])] = rng.choice(HOSTILE)
        elif kind == "tensor":
            entry = header[rng.choice([k for k in header if k != "__metadata__"])]
            entry[rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(HOSTILE)
        elif kind == "input":
            network["input_shape"] = rng.choice(HOSTILE + [[1, 2**20, 2**20], [1, 7, 7]])
        elif kind == "modules":
            i, j = rng.randrange(len(modules)), rng.randrange(len(modules))
            modules[i], modules[j] = modules[j], modules[i]
        elif kind == "metadata":
            header["__metadata__"][rng.choice(["format", "version", "sha256"])] = rng.choice(
                HOSTILE
            )
        else:
            data = bytearray(buffer)
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            buffer = bytes(data)
    metadata = header["__metadata__"]
    metadata["network"] = json.dumps(network)
    resigned = rng.random() < 0.7
    if resigned:
        metadata["sha256"] = hashlib.sha256(metadata["network"].encode() + buffer).hexdigest()
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + buffer, resigned


def bc_campaign(n, rng):
    network = bc_network()
    raw, x = network.to_bytes(), torch.randn(4, 1, 6, 6)
    tally = Tally()
    for i in range(n):
        data, resigned = edit_bc_header(raw, rng) if i % 2 else (mutate(raw, rng), False)
        try:
            loaded = CompressedNetwork.from_bytes(data, "fuzzed.bc")
        except CompressedFileError as e:
            tally.record("clear" if "fuzzed.bc" in str(e) else "other", str(e))
            continue
        except Exception as e:
            tally.record("other", f"{type(e).__name__}: {e}")
            continue
        try:
            with torch.no_grad():
                if not resigned:
                    same = torch.equal(loaded(x), network(x))
                    tally.record("same" if same else "silent", "loaded a different network")
                else:  # a valid file with other contents: it must run and save again
                    probe = torch.randn(2, *loaded.input_shape)
                    again = CompressedNetwork.from_bytes(loaded.to_bytes())(probe)
                    ok = torch.equal(again.nan_to_num(), loaded(probe).nan_to_num())
                    tally.record("accepted" if ok else "silent", "re-saved file differs")
        except Exception as e:
            tally.record("silent", f"loaded but unusable: {type(e).__name__}: {e}")
    return tally


# ----------------------------------------------------------------------------
# Checkpoints


def tiny_guide():
    torch.manual_seed(0)
    pyro.clear_param_store()
    model = BayesianNetwork(OrderedDict(fc1=BayesianLinear(4, 3)), dataset_size=32)
    return pyro_bc.StructuredGuide(model)


def edit_checkpoint(state, rng):
    original, state = state, copy.deepcopy(state)
    cpu = original["rng"]["cpu"]
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["top", "drop", "guide", "rng", "epoch"])
        if kind == "top":
            state[rng.choice(sorted(original) + ["extra"])] = rng.choice(HOSTILE)
        elif kind == "drop":
            state.pop(rng.choice(sorted(original)), None)
        elif kind == "guide" and isinstance(state.get("guide"), dict):
            key = rng.choice(sorted(original["guide"]))
            v = original["guide"][key]
            state["guide"][key] = rng.choice(
                [v.double(), v.long(), v.to(torch.complex64), v.reshape(-1)[:1], v.unsqueeze(0),
                 v * float("nan"), v.to_sparse(), torch.empty(v.shape, device="meta")]
            )  # fmt: skip
        elif kind == "rng" and isinstance(state.get("rng"), dict):
            state["rng"]["cpu"] = rng.choice([cpu.long(), cpu[:10], cpu.float(), [cpu]])
        elif kind == "epoch":
            state["epoch"] = rng.choice([-1, 3, 6, 2**70, 2.0, True, "2"])
    resigned = rng.random() < 0.7
    if resigned and "sha256" in state:
        try:
            state["sha256"] = _digest({k: v for k, v in state.items() if k != "sha256"}, "x")
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def checkpoint_campaign(n, rng, folder):
    guide = tiny_guide()
    optimizer = torch.optim.Adam(guide.parameters(), lr=0.01)
    path = folder / "run.pt"
    pyro_bc.checkpoint.save_checkpoint(path, guide, optimizer, 2, [{"loss": 1.0}, {"loss": 0.5}])
    raw, original = path.read_bytes(), load_checkpoint(path, guide)
    pristine = torch.load(path, weights_only=True)
    tally = Tally()
    for i in range(n):
        structured = i % 2 == 1
        target = folder / "fuzzed.pt"
        target.write_bytes(edit_checkpoint(pristine, rng) if structured else mutate(raw, rng))
        try:
            state = load_checkpoint(target, guide, epochs=5)
        except CheckpointError as e:
            tally.record("clear" if str(target) in str(e) else "other", str(e))
            continue
        except Exception as e:
            tally.record("other", f"{type(e).__name__}: {e}")
            continue
        try:
            if not structured:
                same = all(torch.equal(state["guide"][k], v) for k, v in original["guide"].items())
                same = same and state["epoch"] == original["epoch"]
                tally.record("same" if same else "silent", "loaded a different state")
            else:
                copy.deepcopy(guide).load_state_dict(state["guide"])
                saved = torch.get_rng_state()
                restore_rng_state(state["rng"])
                torch.set_rng_state(saved)
                assert 0 <= state["epoch"] <= 5
                tally.record("accepted")
        except Exception as e:
            tally.record("silent", f"loaded but unusable: {type(e).__name__}: {e}")
    return tally


# ----------------------------------------------------------------------------
# MNIST folders


def mnist_campaign(n, rng, folder):
    source = folder / "mnist-source"
    g = torch.Generator().manual_seed(1)
    contents = {}
    for split, count in (("train", 12), ("t10k", 6)):
        images = torch.randint(0, 256, (count, 28, 28), dtype=torch.uint8, generator=g)
        labels = torch.arange(count, dtype=torch.uint8) % 10
        for kind, tensor in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{split}-{kind}-ubyte"
            write_idx(source / (name + ".gz"), tensor)
            contents[name] = gzip.decompress((source / (name + ".gz")).read_bytes())
            mnist_files.MNIST_SHA256[name] = hashlib.sha256(contents[name]).hexdigest()
    reference = load_mnist(source)
    tally = Tally()
    for _ in range(n):
        root = folder / "mnist"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(source, root)
        name = rng.choice(sorted(contents))
        kind = rng.choice(["gz bytes", "plain", "plain bytes", "other copy", "remove", "stamp"])
        gz = root / (name + ".gz")
        if kind == "gz bytes":
            gz.write_bytes(mutate(gz.read_bytes(), rng))
        elif kind == "plain":
            gz.unlink()
            (root / name).write_bytes(mutate(contents[name], rng))
        elif kind == "plain bytes":
            (root / name).write_bytes(mutate(contents[name], rng))
        elif kind == "other copy":
            (root / name).write_bytes(contents[name][:16] + rng.randbytes(20))
        elif kind == "remove":
            gz.unlink()
        else:
            stamps = json.loads((root / pyro_bc.datasets.storage.STAMP_NAME).read_text())
            stamps[gz.name]["sha256"] = rng.choice(HOSTILE)
            (root / pyro_bc.datasets.storage.STAMP_NAME).write_text(json.dumps(stamps))
        try:
            data = load_mnist(root, verify=rng.random() < 0.8)
        except (DataFileError, FileNotFoundError) as e:
            tally.record("clear" if str(root) in str(e) else "other", str(e))
            continue
        except Exception as e:
            tally.record("other", f"{type(e).__name__}: {e}")
            continue
        same = all(
            torch.equal(getattr(data, f), getattr(reference, f))
            for f in ("train_x", "train_y", "test_x", "test_y")
        )
        # verify=False loads modified files on purpose: a difference there is the contract
        tally.record("same" if same else "accepted", "")
    return tally


# ----------------------------------------------------------------------------
# Bombs, measured in a fresh process: its peak resident memory (VmHWM, reset after the imports)
# above its resident memory then. ru_maxrss would not do: a child keeps its parent's peak.

BOMB_CHILD = r"""
import sys, time
import torch, pyro_bc
from pyro_bc.checkpoint import load_checkpoint
from pyro_bc.datasets import read_idx
kind, path = sys.argv[1], sys.argv[2]
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak to the current resident size
base = status("VmRSS:")
start = time.perf_counter()
try:
    if kind == "bc":
        pyro_bc.load(path)
    elif kind == "gzip":
        read_idx(path, max_bytes=16 + 60_000 * 28 * 28)
    else:
        load_checkpoint(path)
    outcome = "loaded"
except Exception as e:
    outcome = f"{type(e).__name__}: {str(e)[:160]}"
peak = (status("VmHWM:") - base) / 1024
print(f"{peak:.1f}\t{time.perf_counter() - start:.2f}\t{outcome}")
"""


def bombs(folder):
    results = {}
    # 1. a valid .bc of 2^26 one-bit weights: 8 MB on disk, 256 MiB as float32
    n = 2**13
    layer = nn.Linear(n, n, bias=False)
    with torch.no_grad():
        layer.weight.copy_((torch.arange(n * n) % 3 == 0).float().neg().reshape(n, n))
    bc = folder / "bomb.bc"
    CompressedNetwork(OrderedDict(fc=layer), input_shape=(n,), formats={"fc": 0}).save(bc)
    del layer
    # 2. a gzip that inflates to 2 GB of zeros after an MNIST header
    gz = folder / "train-images-idx3-ubyte.gz"
    with gzip.open(gz, "wb", compresslevel=9) as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(s.to_bytes(4, "big") for s in (2**21, 28, 28)))
        zeros = bytes(2**24)
        for _ in range(2 * 2**30 // len(zeros)):
            f.write(zeros)
    # 3. a checkpoint whose zip entries are deflated: 256 MiB of zeros in a small file
    guide = tiny_guide()
    ck = folder / "bomb.pt"
    pyro_bc.checkpoint.save_checkpoint(
        ck, guide, torch.optim.Adam(guide.parameters()), 0, [], model=nn.Linear(2**13, 2**13)
    )
    with zipfile.ZipFile(ck) as source:
        entries = [(i, source.read(i.filename)) for i in source.infolist()]
    with zipfile.ZipFile(ck, "w") as z:
        for info, body in entries:
            z.writestr(info, bytes(len(body)) if "data/" in info.filename else body,
                       compress_type=zipfile.ZIP_DEFLATED)  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for kind, path in (("bc", bc), ("gzip", gz), ("checkpoint", ck)):
        out = subprocess.run(
            [sys.executable, "-c", BOMB_CHILD, kind, str(path)],
            capture_output=True, text=True, env=env, check=True,
        ).stdout.strip().splitlines()[-1]  # fmt: skip
        peak, seconds, outcome = out.split("\t", 2)
        results[kind] = {
            "file_bytes": path.stat().st_size,
            "peak_rss_mib": float(peak),
            "seconds": float(seconds),
            "outcome": outcome,
        }
    return results


# ----------------------------------------------------------------------------
# kill -9 of a checkpointing fit, then resume


def _fit(path, epochs):
    guide_model = BayesianNetwork(
        OrderedDict(fc1=BayesianLinear(8, 16), relu=nn.ReLU(), fc2=BayesianLinear(16, 3)),
        dataset_size=512,
    )
    torch.manual_seed(0)
    guide = pyro_bc.StructuredGuide(guide_model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 8, generator=g), torch.randint(0, 3, (512,), generator=g)
    loader = TensorBatches(x, y, batch_size=32, shuffle=True)
    pyro_bc.fit(guide_model, guide, loader, epochs=epochs, lr=0.01, checkpoint=path,
                resume=True, seed=0, progress=False)  # fmt: skip
    return guide


def kill_trials(n, rng, folder, epochs=6):
    reference = folder / "reference.pt"
    _fit(reference, epochs)
    expected = torch.load(reference, weights_only=True)["guide"]
    outcomes = {"trials": n, "killed_mid_run": 0, "bit_identical": 0, "differences": 0,
                "errors": 0, "temporaries_left": 0, "examples": []}  # fmt: skip
    for trial in range(n):
        path = folder / f"kill{trial}" / "run.pt"
        path.parent.mkdir()
        child = os.fork()
        if child == 0:  # the run to kill
            try:
                _fit(path, epochs)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 1.5))
        os.kill(child, signal.SIGKILL)
        _, status = os.waitpid(child, 0)
        outcomes["killed_mid_run"] += os.WIFSIGNALED(status)
        try:
            _fit(path, epochs)  # resume
            got = torch.load(path, weights_only=True)["guide"]
            same = all(torch.equal(got[k], v) for k, v in expected.items())
            outcomes["bit_identical" if same else "differences"] += 1
        except Exception as e:
            outcomes["errors"] += 1
            outcomes["examples"].append(f"{type(e).__name__}: {str(e)[:200]}")
        outcomes["temporaries_left"] += sum(p.suffix == ".tmp" for p in path.parent.iterdir())
    return outcomes


# ----------------------------------------------------------------------------
# compress on networks that are not chains


class _Custom(BayesianNetwork):
    """A BayesianNetwork whose forward is written by hand: what compress must refuse."""

    def __init__(self, forward_layers, **layers):
        super().__init__(OrderedDict(layers), input_shape=(4,))
        self.__dict__["forward_layers"] = forward_layers

    def forward(self, x, y=None):
        logits = self.forward_layers(self, x)
        with pyro.plate("data", len(x)):
            pyro.sample("obs", pyro.distributions.Categorical(logits=logits), obs=y)
        return logits


def _two_layers(**extra):
    return dict(fc1=BayesianLinear(4, 3), relu=nn.ReLU(), fc2=BayesianLinear(3, 2), **extra)


def compress_misuse():
    shapes = {
        "skip connection": (lambda m, x: m.fc2(m.relu(m.fc1(x)) + x[:, :3]), _two_layers()),
        "two layers summed": (
            lambda m, x: m.fc2(m.relu(m.fc1(x)) + m.relu(m.fc3(x))),
            _two_layers(fc3=BayesianLinear(4, 3)),
        ),
        "layer used twice": (
            lambda m, x: m.fc2(m.relu(m.fc1(m.relu(m.fc1(x))))),
            dict(fc1=BayesianLinear(4, 4), relu=nn.ReLU(), fc2=BayesianLinear(4, 2)),
        ),
    }
    results = {}
    for name, (forward, layers) in shapes.items():
        pyro.clear_param_store()
        guide = pyro_bc.StructuredGuide(_Custom(forward, **layers))
        try:
            pyro_bc.compress(guide)
            results[name] = "compressed (wrong network built)"
        except ValueError as e:
            results[name] = f"refused: {str(e)[:160]}"
        except Exception as e:
            results[name] = f"other {type(e).__name__}: {str(e)[:160]}"
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the input counts")
    parser.add_argument("--kill-trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-bombs", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    counts = {
        k: int(v * args.scale) for k, v in {"bc": 3000, "checkpoint": 400, "mnist": 100}.items()
    }
    report = {"command": " ".join(["python"] + sys.argv), "families": {}}
    with tempfile.TemporaryDirectory(prefix="pyro_bc-adversarial-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        report["families"][".bc files"] = bc_campaign(counts["bc"], rng).row()
        report["families"]["checkpoints"] = checkpoint_campaign(
            counts["checkpoint"], rng, folder
        ).row()
        report["families"]["MNIST folders"] = mnist_campaign(counts["mnist"], rng, folder).row()
        report["fuzz_seconds"] = round(time.perf_counter() - start, 1)
        if not args.no_bombs:
            report["bombs"] = bombs(folder)
        report["kill_9"] = kill_trials(args.kill_trials, rng, folder)
        report["compress_non_chains"] = compress_misuse()
    print(
        f"{'family':<15}{'tried':>7}{'clear':>7}{'same':>6}{'accepted':>9}{'other':>7}{'silent':>7}"
    )
    for name, row in report["families"].items():
        print(f"{name:<15}{row['tried']:>7}{row['clear']:>7}{row['same']:>6}{row['accepted']:>9}"
              f"{row['other']:>7}{row['silent']:>7}")  # fmt: skip
        for example in row["examples"]:
            print(f"    {example}")
    for kind, bomb in report.get("bombs", {}).items():
        print(
            f"bomb {kind:<11} {bomb['file_bytes']:>12,} B on disk, peak "
            f"+{bomb['peak_rss_mib']:.0f} MiB, {bomb['seconds']:.1f} s: {bomb['outcome'][:90]}"
        )
    print("kill -9:", {k: v for k, v in report["kill_9"].items() if k != "examples"})
    for name, outcome in report["compress_non_chains"].items():
        print(f"compress, {name}: {outcome[:110]}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    pyro_bc.files.write_atomically(RESULTS, json.dumps(report, indent=1).encode())


if __name__ == "__main__":
    main()
