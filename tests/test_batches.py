"""Malformed data is an error that names the reader, never a wrong number."""

from collections import OrderedDict

import numpy as np
import pyro
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pyro_bc
from pyro_bc.batches import batches, check_inputs, require_reiterable
from pyro_bc.compression import refit
from pyro_bc.nn import BayesianLinear, BayesianNetwork


def _network():
    model = BayesianNetwork(
        OrderedDict(fc1=BayesianLinear(6, 5), relu=nn.ReLU(), fc2=BayesianLinear(5, 3)),
        input_shape=(6,),
        dataset_size=16,
    )
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    return model, pyro_bc.StructuredGuide(model), x, y


def test_each_batch_is_checked_as_it_is_read():
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    assert [b[1].tolist() for b in batches([(x, y)] * 2, "here")] == [[0, 1, 2, 0]] * 2
    cases = [
        (TypeError, [x], r"here: each batch must be an \(x, y\) pair of tensors, got Tensor"),
        (TypeError, [(x, y, y)], r"got a tuple of 3 \(Tensor, Tensor, Tensor\)"),
        (TypeError, [{"x": x, "y": y}], "got dict"),
        (ValueError, [(x, y[:, None])], r"integer class indices of shape \(batch,\).*\(4, 1\)"),
        (ValueError, [(x, y.float())], "torch.float32"),
        (ValueError, [(x[:3], y)], r"4 labels has inputs of shape \(3, 6\)"),
        (ValueError, [], "here: the loader yielded no batches$"),
        (ValueError, iter([]), "an iterator is read once"),
    ]
    for error, loader, message in cases:
        with pytest.raises(error, match=message):
            list(batches(loader, "here"))


def test_a_one_pass_loader_is_refused_where_it_is_read_again():
    require_reiterable([], "here")
    require_reiterable(DataLoader(TensorDataset(torch.zeros(2))), "here")
    with pytest.raises(TypeError, match="here: got generator, an iterator that can be read only"):
        require_reiterable((b for b in []), "here")


def test_labels_outside_the_classes_are_refused_not_counted_as_errors():
    model, guide, x, y = _network()
    outside = [(x, y + 5)]
    with pytest.raises(ValueError, match="evaluate: 16 labels lie outside 0..2"):
        pyro_bc.evaluate(model, guide, outside)
    compressed = pyro_bc.compress(guide)
    with pytest.raises(ValueError, match="CompressedNetwork.evaluate: 16 labels lie outside"):
        compressed.evaluate(outside)
    # before, every candidate was within a budget over 100% error: all but one group pruned
    with pytest.raises(ValueError, match="labels lie outside 0..2"):
        pyro_bc.compress(guide, validation=outside, max_error_increase=0.0)
    # labels (B, 1) broadcast against predictions (B,) into a (B, B) comparison
    with pytest.raises(ValueError, match=r"evaluate: labels .* shape \(batch,\)"):
        pyro_bc.evaluate(model, guide, [(x, y[:, None])])


def test_fit_checks_every_batch_and_its_arguments():
    model, guide, x, y = _network()
    good, bad = (x[:8], y[:8]), (x[8:], y[8:, None])
    with pytest.raises(ValueError, match=r"fit: labels must be .* shape \(8, 1\)"):
        pyro_bc.fit(model, guide, [good, bad], progress=False)
    with pytest.raises(TypeError, match=r"fit\(train_loader=...\): got generator"):
        pyro_bc.fit(model, guide, (b for b in [good]), epochs=3, progress=False)
    with pytest.raises(ValueError, match="fit: the loader yielded no batches"):
        pyro_bc.fit(model, guide, [], progress=False)
    for arguments, message in [
        ({"epochs": -1}, "epochs must be an integer of at least 0"),
        ({"max_steps": 0}, "max_steps must be an integer of at least 1"),
        ({"num_particles": 0}, "num_particles must be an integer of at least 1"),
        ({"keep_last": -1}, "keep_last must be an integer of at least 0"),
        ({"seed": "0"}, "seed must be an integer of at least 0"),
        ({"lr": 0}, "lr must be a positive learning rate, got 0"),
        ({"lr": -1e-3}, "lr must be a positive learning rate"),
    ]:
        with pytest.raises(ValueError, match=message):
            pyro_bc.fit(model, guide, [good], progress=False, **arguments)
    with pytest.raises(ValueError, match="num_samples must be an integer of at least 0"):
        pyro_bc.evaluate(model, guide, [good], num_samples=-1)


def test_a_numpy_seed_trains_as_the_same_python_integer():
    trained = []
    for seed in [3, np.int64(3)]:
        pyro.set_rng_seed(0)
        model, guide, x, y = _network()
        pyro_bc.fit(model, guide, [(x, y)], epochs=2, seed=seed, progress=False)
        trained.append(torch.cat([p.detach().flatten() for p in guide.parameters()]))
    assert torch.equal(*trained)


def test_inputs_the_network_cannot_take_are_refused_by_name():
    model, guide, x, y = _network()
    for inputs, wrong in [
        (x[:, :5], r"\(16, 5\) and dtype torch.float32"),
        (x.long(), r"\(16, 6\) and dtype torch.int64"),
    ]:
        message = rf"BayesianNetwork: inputs of shape {wrong}.*floating-point .* \(batch, 6\)"
        with pytest.raises(ValueError, match=message):
            pyro_bc.fit(model, guide, [(inputs, y)], progress=False)
        with pytest.raises(ValueError, match="CompressedNetwork.evaluate: inputs of shape"):
            pyro_bc.compress(guide).evaluate([(inputs, y)])
    check_inputs(x, (6,), "here")
    check_inputs(torch.randn(2, 3, 4), None, "here")  # any shape where the network names none
    with pytest.raises(ValueError, match=r"here: .* shape \(batch, \.\.\.\)"):
        check_inputs(x.int(), None, "here")


def test_compress_and_refit_refuse_what_they_cannot_honour(tmp_path):
    model, guide, x, y = _network()
    data = [(x, y)]
    for value in (float("nan"), -0.1, 5.0, "0.1", True):
        with pytest.raises(ValueError, match="reference_error is an error rate in"):
            pyro_bc.compress(guide, validation=data, max_error_increase=0.0, reference_error=value)
    with pytest.raises(TypeError, match=r"compress\(validation=...\): got generator"):
        pyro_bc.compress(guide, validation=(b for b in data), max_error_increase=0.0)

    chosen = pyro_bc.compress(guide)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    with pytest.raises(TypeError, match="refit: max_error_increase, validation cannot be passed"):
        refit(chosen, guide, loader, epochs=1, lr=1e-3, validation=data, max_error_increase=0.5)
    with pytest.raises(TypeError, match="refit: train_loader must be a DataLoader.*got list"):
        refit(chosen, guide, data, epochs=1, lr=1e-3)
    chosen.save(tmp_path / "chosen.bc")
    with pytest.raises(ValueError, match="refit: compressed has no report"):
        refit(pyro_bc.load(tmp_path / "chosen.bc"), guide, loader, epochs=1, lr=1e-3)
