"""Two CPU processes under torchrun (gloo): DDP's averaged gradient is the single-process
gradient of the combined batch, and a resumed distributed run matches an uninterrupted one."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch.distributed as dist

import pyro_bc
from pyro_bc.cli import main

WORKER = textwrap.dedent(
    """
    import json, sys
    from collections import OrderedDict

    import pyro
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import pyro_bc
    from pyro_bc.infer import TrainingStep
    from pyro_bc.nn import BayesianLinear, BayesianNetwork

    torch.set_num_threads(1)
    out = sys.argv[1]
    device = pyro_bc.distributed.setup()
    rank, world = pyro_bc.distributed.rank(), pyro_bc.distributed.world_size()

    def build(seed):
        torch.manual_seed(seed)
        relu = torch.nn.ReLU()
        layers = OrderedDict(fc1=BayesianLinear(6, 5), relu=relu, fc2=BayesianLinear(5, 3))
        model = BayesianNetwork(layers, dataset_size=64)
        return model, pyro_bc.StructuredGuide(model)

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=generator)
    y = torch.randint(0, 3, (64,), generator=generator)

    # one step's gradient: the shards (DDP) against the whole batch (one process), same noise
    model, guide = build(0)
    step = TrainingStep(model, guide, local_reparameterization=False, distributed=True)
    shard = slice(rank * 8 // world, (rank + 1) * 8 // world)
    pyro.set_rng_seed(5)
    loss, _ = step.backward(x[shard], y[shard])
    averaged = [p.grad.clone() for p in guide.parameters()]
    losses = [torch.zeros(()) for _ in range(world)]
    torch.distributed.all_gather(losses, loss)
    model, guide = build(0)
    single = TrainingStep(model, guide, local_reparameterization=False)
    pyro.set_rng_seed(5)
    whole_loss, _ = single.backward(x[:8], y[:8])
    whole = [p.grad for p in guide.parameters()]
    grad_diff = max(((a - w).abs().max() / w.abs().max()).item() for a, w in zip(averaged, whole))
    loss_diff = abs(sum(losses).item() / world - whole_loss.item()) / abs(whole_loss.item())

    # a resumed run matches an uninterrupted one
    def run(epochs, seed, checkpoint=None, resume=False):
        model, guide = build(seed)
        loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
        history = pyro_bc.fit(
            model, guide, loader, epochs=epochs, seed=3, progress=False,
            checkpoint=checkpoint, resume=resume, distributed=True,
        )
        return guide.state_dict(), history

    uninterrupted, history = run(2, 0)
    run(1, 0, out + "/run.pt")
    resumed, _ = run(2, 99, out + "/run.pt", resume=True)
    equal = all(torch.equal(resumed[k], v) for k, v in uninterrupted.items())
    if rank == 0:
        with open(out + "/result.json", "w") as f:
            json.dump({
                "grad_diff": grad_diff, "loss_diff": loss_diff, "resumed_equal": equal,
                "epochs": len(history), "world": world,
            }, f)
    pyro_bc.distributed.cleanup()
    """
)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_two_processes_average_to_the_combined_batch_and_resume(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(script), str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads((tmp_path / "result.json").read_text())
    assert outcome["world"] == 2 and outcome["epochs"] == 2
    assert outcome["grad_diff"] < 1e-5
    assert outcome["loss_diff"] < 1e-6
    assert outcome["resumed_equal"]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_the_command_trains_on_two_processes_under_torchrun(tmp_path, capsys):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", "-m", "pyro_bc.cli", "run", "--epochs", "1"]
    command += ["--pretrain-epochs", "1", "--mc-samples", "0", "--no-figures", "--quiet"]
    command += ["--out", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["epochs"] == 1
    # process 0 alone compressed and wrote the file; it reads back to the reported error
    network = pyro_bc.load(tmp_path / "model.bc")
    assert (
        network.report is None and summary["file_bytes"] == (tmp_path / "model.bc").stat().st_size
    )
    assert main(["evaluate", str(tmp_path / "model.bc")]) == 0
    result = json.loads(capsys.readouterr().out)
    errors = round(summary["test_error_compressed"] * result["n"])
    assert round(result["error"] * result["n"]) == errors
