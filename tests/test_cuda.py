"""Training, resuming, tracing and compressing on a CUDA device (skipped where there is none).

``test_devices.py`` checks on ``meta`` tensors that everything follows the guide's device; these
run the real kernels, so they also check what ``meta`` cannot: the CUDA random stream (tracing
forks it, checkpoints keep it) and that a posterior trained on the GPU compresses to the network
its CPU copy gives.
"""

import copy
import warnings

import pyro
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import pyro_bc
from pyro_bc.compression import analyse, compress_retrained, refit
from pyro_bc.compression.calibration import input_means
from pyro_bc.datasets import load_mnist_subset
from pyro_bc.infer import TrainingStep, linear_decay
from pyro_bc.models import LeNet5Caffe, LeNet300100
from pyro_bc.priors import GroupHorseshoe, GroupNormalJeffreys
from pyro_bc.tracing import TracedLoss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def mnist():
    data = load_mnist_subset()
    return (
        TensorDataset(data.train_x[:1024], data.train_y[:1024]),
        TensorDataset(data.test_x[:1000], data.test_y[:1000]),
    )


def _setup(train, seed=0, network=LeNet300100, prior=GroupNormalJeffreys):
    torch.manual_seed(seed)
    model = network(prior(), dataset_size=len(train)).to(CUDA)
    guide = pyro_bc.StructuredGuide(model)
    return model, guide, DataLoader(train, batch_size=128, shuffle=True)


def _state(guide):
    return {name: value.clone() for name, value in guide.state_dict().items()}


def test_a_cuda_run_resumes_bit_for_bit(mnist, tmp_path):
    train, _ = mnist
    schedule = linear_decay(1, 2, final=0.5)
    model, guide, loader = _setup(train)
    pyro_bc.fit(model, guide, loader, epochs=2, seed=3, progress=False, lr_schedule=schedule)
    uninterrupted = _state(guide)
    assert all(value.device.type == "cuda" for value in uninterrupted.values())

    checkpoint = tmp_path / "run.pt"
    model, guide, loader = _setup(train)
    common = {"seed": 3, "progress": False, "checkpoint": checkpoint, "lr_schedule": schedule}
    pyro_bc.fit(model, guide, loader, epochs=1, **common)
    model, guide, loader = _setup(train, seed=99)  # a fresh process starts elsewhere
    pyro_bc.fit(model, guide, loader, epochs=2, resume=True, **common)
    for name, value in _state(guide).items():
        assert torch.equal(value, uninterrupted[name]), name


@pytest.mark.parametrize(
    "network, prior",
    [(LeNet300100, GroupNormalJeffreys), (LeNet5Caffe, GroupHorseshoe)],
    ids=["dense GNJ", "conv horseshoe"],
)
def test_traced_cuda_steps_give_the_python_steps_parameters(mnist, network, prior, monkeypatch):
    # cuDNN may pick a convolution's backward kernel by speed, and some add in any order:
    # bit-for-bit comparisons need the deterministic ones (in the traced and the Python steps)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    train, _ = mnist
    model, guide, _ = _setup(train, network=network, prior=prior)
    start = copy.deepcopy(guide.state_dict())
    x, y = train.tensors[0].to(CUDA), train.tensors[1].to(CUDA)
    batches = [(x[i : i + 64], y[i : i + 64]) for i in (0, 64, 128)]

    def run(trace):
        guide.load_state_dict(start)
        step = TrainingStep(model, guide, lr=1e-2, trace=trace)
        pyro.set_rng_seed(1)
        losses = [step(*batches[i % 3])[0].item() for i in range(9)]
        return losses, _state(guide), step.loss.traced

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a refused trace warns
        traced_losses, traced_state, traced = run(True)
    losses, state, _ = run(False)
    again, again_state, _ = run(False)
    assert again == losses, "the Python steps themselves are not reproducible on this device"
    assert all(torch.equal(again_state[name], value) for name, value in state.items())
    assert traced.refused is None and len(traced.traces) == 1
    assert traced_losses == losses
    for name, value in state.items():
        assert torch.equal(traced_state[name], value), name


def test_tracing_on_cuda_draws_nothing_from_the_cuda_stream(mnist):
    train, _ = mnist
    model, guide, _ = _setup(train)
    traced = TracedLoss(model, guide)
    x, y = train.tensors[0][:32].to(CUDA), train.tensors[1][:32].to(CUDA)
    torch.manual_seed(3)
    loss, _ = traced(x, y)  # traces and checks under a forked stream, then replays
    torch.manual_seed(3)
    replayed, _ = traced(x, y)  # replays only
    assert traced.traces and torch.equal(loss, replayed)


def test_a_posterior_trained_on_cuda_compresses_as_its_cpu_copy(mnist):
    train, test = mnist
    model, guide, loader = _setup(train)
    pyro_bc.fit(model, guide, loader, epochs=3, lr=1e-2, seed=0, progress=False)
    test_loader = DataLoader(test, batch_size=500)
    on_cuda = pyro_bc.compress(guide, thresholds=-2.0, test_loader=test_loader)
    dense_cuda = pyro_bc.evaluate(model, guide, test_loader)["error"]
    guide.to("cpu")
    model.to("cpu")
    on_cpu = pyro_bc.compress(guide, thresholds=-2.0, test_loader=test_loader)
    assert pyro_bc.evaluate(model, guide, test_loader)["error"] == dense_cuda
    assert on_cuda.report.architecture == on_cpu.report.architecture
    assert on_cuda.report.pruning_rate < float("inf")
    cpu_state = on_cpu.state_dict()
    for name, value in on_cuda.state_dict().items():
        # the same fixed-point values, wherever the posterior's summaries were computed
        torch.testing.assert_close(value.cpu(), cpu_state[name], rtol=0, atol=0)
    assert abs(on_cuda.report.test_error - on_cpu.report.test_error) <= 1 / len(test)


def test_retraining_calibrating_and_refitting_a_cuda_posterior(mnist):
    train, _ = mnist
    held_out = TensorDataset(*(t[768:] for t in train.tensors))
    train = TensorDataset(*(t[:768] for t in train.tensors))
    model, guide, loader = _setup(train)
    pyro_bc.fit(model, guide, loader, epochs=3, lr=1e-2, seed=0, progress=False)
    validation = DataLoader(held_out, batch_size=256)
    compressed, thinned = compress_retrained(
        guide,
        loader,
        validation=validation,
        max_error_increase=0.02,
        prune_error_increase=0.1,
        epochs=1,
        lr=1e-3,
        seed=0,
    )
    assert compressed.report.retraining is not None
    assert all(p.device.type == "cuda" for p in thinned.parameters())
    # the thinned posterior's Gather modules live on the GPU: calibration runs there too
    analysis = analyse(thinned)
    on_cuda, n = input_means(analysis.chain, analysis.summaries, loader)
    thinned.to("cpu")
    thinned.model.to("cpu")
    analysis = analyse(thinned)
    on_cpu, _ = input_means(analysis.chain, analysis.summaries, loader)
    assert n == len(train) and on_cuda.keys() == on_cpu.keys()
    for site, mean in on_cuda.items():
        torch.testing.assert_close(mean, on_cpu[site], rtol=1e-5, atol=1e-6)
    thinned.to(CUDA)
    thinned.model.to(CUDA)
    refitted, _ = refit(compressed, thinned, loader, epochs=1, lr=1e-3, seed=0)
    assert refitted.report.architecture == compressed.report.architecture
