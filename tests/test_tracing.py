import copy
import warnings
from collections import OrderedDict

import pyro
import pytest
import torch
from torch import nn

import pyro_bc
from pyro_bc.datasets import TensorBatches
from pyro_bc.distributions import ImproperLogUniform
from pyro_bc.infer import TrainingStep
from pyro_bc.models import VGG16, LeNet5Caffe, LeNet300100
from pyro_bc.nn import BayesianLinear, BayesianNetwork
from pyro_bc.priors import GroupHorseshoe, GroupNormalJeffreys
from pyro_bc.tracing import MAX_TRACES, TracedLoss


def _batches(shape, sizes=(16, 16, 5)):
    """Full batches and a smaller last one, as a loader gives."""
    xs = [torch.randn(size, *shape) for size in sizes]
    return [(x, torch.randint(0, 10, (len(x),))) for x in xs]


def _train(model, guide, batches, trace, steps=12):
    """Losses and the guide's and model's state after ``steps`` steps from the same start."""
    guide_state = copy.deepcopy(guide.state_dict())
    model_state = copy.deepcopy(model.state_dict())
    step = TrainingStep(model, guide, lr=1e-2, trace=trace)
    pyro.set_rng_seed(1)
    losses = [step(*batches[i % len(batches)])[0].item() for i in range(steps)]
    result = losses, copy.deepcopy(guide.state_dict()), copy.deepcopy(model.state_dict())
    guide.load_state_dict(guide_state)
    model.load_state_dict(model_state)
    return result, step.loss.traced


NETWORKS = {
    "dense, normal-Jeffreys": (lambda: LeNet300100(GroupNormalJeffreys(), 600), (1, 28, 28)),
    "conv, horseshoe": (lambda: LeNet5Caffe(GroupHorseshoe(), 600), (1, 28, 28)),
    "batch norm": (lambda: VGG16(GroupNormalJeffreys(), 600, width=4), (3, 32, 32)),
}


@pytest.mark.parametrize("network", NETWORKS)
def test_traced_steps_give_the_python_steps_parameters_bit_for_bit(network):
    build, shape = NETWORKS[network]
    torch.manual_seed(0)
    model = build()
    guide = pyro_bc.StructuredGuide(model)
    batches = _batches(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no refusal
        (traced_losses, traced_guide, traced_model), traced = _train(model, guide, batches, True)
    (losses, guide_state, model_state), untraced = _train(model, guide, batches, False)
    assert untraced is None and traced.refused is None
    assert len(traced.traces) == 2  # the full batches' shape and the last batch's
    assert traced_losses == losses
    for name, value in guide_state.items():
        assert torch.equal(traced_guide[name], value), name
    for name, value in model_state.items():  # batch norm's running statistics too
        assert torch.equal(traced_model[name], value), name


def test_tracing_draws_no_random_numbers():
    torch.manual_seed(0)
    model = LeNet300100(GroupNormalJeffreys(), 100)
    traced = TracedLoss(model, pyro_bc.StructuredGuide(model))
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    torch.manual_seed(3)
    loss, logits = traced(x, y)  # traces, checks, then replays
    torch.manual_seed(3)
    replayed, _ = traced(x, y)  # replays only
    assert torch.equal(loss, replayed) and logits.shape == (4, 10)


def _branching_prior(name, num_groups):
    z = pyro.sample(f"{name}.scale", ImproperLogUniform().expand([num_groups]).to_event(1))
    return z if z.sum() > 0 else -z


class _CallCounter(nn.Module):
    """Scales its input by how often it has run: Python state a trace would freeze."""

    calls = 0

    def forward(self, x):
        self.calls += 1
        return x * self.calls


def test_a_prior_that_branches_on_a_value_is_not_traced_and_trains_as_in_python():
    torch.manual_seed(0)
    layers = OrderedDict(flatten=nn.Flatten(), fc1=BayesianLinear(784, 10, prior=_branching_prior))
    model = BayesianNetwork(layers, dataset_size=100)
    guide = pyro_bc.StructuredGuide(model)
    batches = _batches((1, 28, 28))
    with pytest.warns(RuntimeWarning, match=r"test_tracing\.py:\d+ converts a tensor to a Python"):
        (traced_losses, traced_guide, _), traced = _train(model, guide, batches, True)
    assert traced.refused is not None and not traced.traces
    (losses, guide_state, _), _ = _train(model, guide, batches, False)
    assert traced_losses == losses
    for name, value in guide_state.items():
        assert torch.equal(traced_guide[name], value), name


def test_a_network_with_python_state_is_not_traced_and_runs_its_python_every_step():
    torch.manual_seed(0)
    counter = _CallCounter()
    layers = OrderedDict(
        flatten=nn.Flatten(),
        count=counter,
        fc1=BayesianLinear(784, 10, prior=GroupNormalJeffreys()),
    )
    model = BayesianNetwork(layers, dataset_size=100)
    step = TrainingStep(model, pyro_bc.StructuredGuide(model))
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    step(x, y)  # the validated first step
    with pytest.warns(RuntimeWarning, match="differs from the Python's"):
        step(x, y)  # a trace would have frozen the count
    calls = counter.calls
    step(x, y)
    assert counter.calls == calls + 1 and step.loss.traced.refused is not None


def test_fit_traces_by_default_and_trains_to_the_untraced_parameters(monkeypatch):
    traced_shapes = []
    checked_trace = TracedLoss._checked_trace

    def counting(self, x, y):
        traced_shapes.append(len(x))
        return checked_trace(self, x, y)

    monkeypatch.setattr(TracedLoss, "_checked_trace", counting)
    x, y = torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,))
    loader = TensorBatches(x, y, batch_size=16, shuffle=True)

    def fit(**options):
        torch.manual_seed(0)
        model = LeNet300100(GroupNormalJeffreys(), 40)
        guide = pyro_bc.StructuredGuide(model)
        history = pyro_bc.fit(model, guide, loader, epochs=2, seed=3, progress=False, **options)
        return history["loss"], guide.state_dict()

    traced_losses, traced = fit()
    assert sorted(traced_shapes) == [8, 16]  # each batch shape once, over both epochs
    losses, untraced = fit(trace=False)
    assert len(traced_shapes) == 2
    assert traced_losses == losses
    for name, value in untraced.items():
        assert torch.equal(traced[name], value), name


def test_batches_of_ever_new_shapes_stop_being_traced():
    model = LeNet300100(GroupNormalJeffreys(), 100)
    traced = TracedLoss(model, pyro_bc.StructuredGuide(model))
    for size in range(1, MAX_TRACES + 1):
        assert traced(torch.randn(size, 1, 28, 28), torch.randint(0, 10, (size,))) is not None
    with pytest.warns(RuntimeWarning, match=f"more than {MAX_TRACES} batch shapes"):
        assert traced(torch.randn(20, 1, 28, 28), torch.randint(0, 10, (20,))) is None
    assert traced(torch.randn(1, 1, 28, 28), torch.randint(0, 10, (1,))) is None
