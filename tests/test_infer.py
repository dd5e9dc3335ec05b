import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import pyro_bc
from pyro_bc.datasets import load_mnist_subset
from pyro_bc.infer import linear_decay
from pyro_bc.models import LeNet300100


@pytest.fixture(scope="module")
def small_mnist():
    data = load_mnist_subset()
    return (
        TensorDataset(data.train_x[:512], data.train_y[:512]),
        TensorDataset(data.test_x[:500], data.test_y[:500]),
    )


def _setup(train, seed=0):
    torch.manual_seed(seed)
    model = LeNet300100(dataset_size=len(train))
    guide = pyro_bc.StructuredGuide(model)
    return model, guide, DataLoader(train, batch_size=64, shuffle=True)


def test_fit_lowers_the_loss_and_records_history(small_mnist):
    train, test = small_mnist
    model, guide, loader = _setup(train)
    history = pyro_bc.fit(
        model,
        guide,
        loader,
        epochs=3,
        lr=1e-2,
        seed=0,
        progress=False,
        test_loader=DataLoader(test, batch_size=250),
    )
    assert len(history) == 3
    losses = history["loss"]
    assert losses[-1] < losses[0]
    assert all(0 <= e <= 1 for e in history["test_error"])


def test_resumed_run_equals_uninterrupted_run(small_mnist, tmp_path):
    train, _ = small_mnist
    schedule = linear_decay(1, 2, final=0.5)
    model, guide, loader = _setup(train)
    pyro_bc.fit(model, guide, loader, epochs=2, seed=3, progress=False, lr_schedule=schedule)
    uninterrupted = {k: v.clone() for k, v in guide.state_dict().items()}

    checkpoint = tmp_path / "run.pt"
    model, guide, loader = _setup(train)
    pyro_bc.fit(
        model,
        guide,
        loader,
        epochs=1,
        seed=3,
        progress=False,
        checkpoint=checkpoint,
        lr_schedule=schedule,
    )
    # a fresh process would rebuild model and guide with other random initial values
    model, guide, loader = _setup(train, seed=99)
    history = pyro_bc.fit(
        model,
        guide,
        loader,
        epochs=2,
        seed=3,
        progress=False,
        checkpoint=checkpoint,
        resume=True,
        lr_schedule=schedule,
    )
    assert len(history) == 2
    for name, value in guide.state_dict().items():
        torch.testing.assert_close(value, uninterrupted[name], rtol=0, atol=0, msg=name)
    assert not list(tmp_path.glob(".*tmp"))


def test_linear_decay_sets_the_learning_rate_per_epoch(small_mnist):
    train, _ = small_mnist
    model, guide, loader = _setup(train)
    rates = []
    optimizer = torch.optim.Adam(guide.parameters(), lr=0.01)
    pyro_bc.fit(
        model,
        guide,
        loader,
        epochs=4,
        optimizer=optimizer,
        max_steps=1,
        progress=False,
        lr_schedule=linear_decay(1, 3, final=0.1),
        callback=lambda epoch, record: rates.append(optimizer.param_groups[0]["lr"]),
    )
    assert rates == pytest.approx([0.01, 0.01, 0.0055, 0.001])
    with pytest.raises(ValueError, match="start < end"):
        linear_decay(3, 3)


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        pyro_bc.load_checkpoint(tmp_path / "nothing.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pt"):
        pyro_bc.load_checkpoint(broken)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not written by pyro_bc.fit"):
        pyro_bc.load_checkpoint(other)


def test_checkpoint_with_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    hostile = tmp_path / "hostile.pt"
    torch.save({"guide": Payload()}, hostile)
    with pytest.raises(ValueError, match="hostile.pt"):
        pyro_bc.load_checkpoint(hostile)


def test_evaluate_posterior_mean_and_monte_carlo(small_mnist):
    train, test = small_mnist
    model, guide, _ = _setup(train)
    loader = DataLoader(test, batch_size=100)
    result = pyro_bc.evaluate(model, guide, loader, num_samples=3)
    assert result["n"] == 500
    expected = (
        sum(
            (pyro_bc.predict_logits(model, guide, x).argmax(-1) != y).sum().item()
            for x, y in loader
        )
        / 500
    )
    assert result["error"] == expected
    assert 0 <= result["error_mc"] <= 1
    with pytest.raises(ValueError, match="mode"):
        pyro_bc.predict_logits(model, guide, test.tensors[0][:2], mode="median")
