import warnings

import pyro
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import pyro_bc
from pyro_bc import CheckpointError, TrainingDivergedError
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
    # the last epoch's record is the error of the parameters fit returns
    final = pyro_bc.evaluate(model, guide, DataLoader(test, batch_size=250))["error"]
    assert history["test_error"][-1] == final
    assert len(set(history["test_error"])) > 1


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
    pyro.set_rng_seed(3)
    result = pyro_bc.evaluate(model, guide, loader, num_samples=3)
    assert result["n"] == 500
    pyro.set_rng_seed(3)  # the same draws, in the same order, recomputed by hand
    errors = errors_mc = 0
    for x, y in loader:
        errors += (pyro_bc.predict_logits(model, guide, x).argmax(-1) != y).sum().item()
        probs = sum(
            pyro_bc.predict_logits(model, guide, x, mode="sample").softmax(-1) for _ in range(3)
        )
        errors_mc += (probs.argmax(-1) != y).sum().item()
    assert result["error"] == errors / 500
    assert result["error_mc"] == errors_mc / 500
    with pytest.raises(ValueError, match="mode"):
        pyro_bc.predict_logits(model, guide, test.tensors[0][:2], mode="median")


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_nan_in_the_data_stops_training_and_keeps_the_last_good_checkpoint(small_mnist, tmp_path):
    train, _ = small_mnist
    model, guide, _ = _setup(train)
    loader = DataLoader(train, batch_size=64)  # in order: example 150 is in the third batch
    checkpoint = tmp_path / "run.pt"
    pyro_bc.fit(model, guide, loader, epochs=1, seed=0, progress=False, checkpoint=checkpoint)
    good = {k: v.clone() for k, v in guide.state_dict().items()}
    saved = checkpoint.read_bytes()

    x, y = train.tensors
    x = x.clone()
    x[150, 0, 14, 14] = float("nan")
    poisoned = DataLoader(TensorDataset(x, y), batch_size=64)
    expected = r"epoch 2, step 3\b.*keeps the state after epoch 1"
    with pytest.raises(TrainingDivergedError, match=expected) as info:
        pyro_bc.fit(
            model, guide, poisoned, epochs=3, progress=False, checkpoint=checkpoint, resume=True
        )
    assert (info.value.epoch, info.value.step) == (2, 3)
    assert checkpoint.read_bytes() == saved
    state = pyro_bc.load_checkpoint(checkpoint, guide)
    assert state["epoch"] == 1
    for name, value in good.items():
        torch.testing.assert_close(state["guide"][name], value, rtol=0, atol=0, msg=name)


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_a_huge_learning_rate_diverges_with_the_epoch_and_step_named(small_mnist, tmp_path):
    train, _ = small_mnist
    model, guide, _ = _setup(train)
    loader = DataLoader(train, batch_size=64)
    checkpoint = tmp_path / "run.pt"
    pyro_bc.fit(model, guide, loader, epochs=1, seed=0, progress=False, checkpoint=checkpoint)
    saved = checkpoint.read_bytes()
    with (
        pytest.warns(UserWarning, match=r"with lr=10\b.*trained with lr=0.001"),
        pytest.raises(TrainingDivergedError, match=r"epoch 2, step \d+") as info,
    ):
        pyro_bc.fit(
            model,
            guide,
            loader,
            epochs=5,
            lr=10.0,
            seed=0,
            progress=False,
            checkpoint=checkpoint,
            resume=True,
        )
    assert info.value.epoch == 2 and 1 <= info.value.step <= len(loader)
    assert checkpoint.read_bytes() == saved
    assert not pyro_bc.checkpoint.non_finite_entries(pyro_bc.load_checkpoint(checkpoint)["guide"])


def test_a_new_learning_rate_applies_on_resume_and_the_old_one_stays_otherwise(
    small_mnist, tmp_path
):
    train, _ = small_mnist
    model, guide, loader = _setup(train)
    checkpoint = tmp_path / "run.pt"
    common = dict(max_steps=1, progress=False, checkpoint=checkpoint, resume=True)
    rates = []

    def record(epoch, _):
        optimizer = pyro_bc.load_checkpoint(checkpoint)["optimizer"]
        rates.append(optimizer["param_groups"][0]["lr"])

    pyro_bc.fit(model, guide, loader, epochs=1, lr=0.01, callback=record, **common)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no lr given: the checkpoint's, silently
        pyro_bc.fit(model, guide, loader, epochs=2, callback=record, **common)
    with pytest.warns(UserWarning, match=r"lr=0.002.*lr=0.01"):
        pyro_bc.fit(model, guide, loader, epochs=3, lr=0.002, callback=record, **common)
    assert rates == [0.01, 0.01, 0.002]


def test_a_checkpoint_past_the_requested_epochs_is_an_error(small_mnist, tmp_path):
    train, _ = small_mnist
    model, guide, loader = _setup(train)
    checkpoint = tmp_path / "run.pt"
    pyro_bc.fit(model, guide, loader, epochs=2, max_steps=1, progress=False, checkpoint=checkpoint)
    history = pyro_bc.fit(
        model, guide, loader, epochs=2, progress=False, checkpoint=checkpoint, resume=True
    )
    assert len(history) == 2  # done already: nothing to train
    with pytest.raises(CheckpointError, match=r"run.pt is at epoch 2, past epochs=1"):
        pyro_bc.fit(
            model, guide, loader, epochs=1, progress=False, checkpoint=checkpoint, resume=True
        )


def test_a_model_without_dataset_size_is_warned_about_its_mini_batches():
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    model = LeNet300100()  # dataset_size None: a batch of 16 would count as all 64 examples
    guide = pyro_bc.StructuredGuide(model)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    with pytest.warns(UserWarning, match=r"dataset_size is None.*4 times too much.*\(64\)"):
        pyro_bc.fit(model, guide, loader, max_steps=1, progress=False)
    model.dataset_size = 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pyro_bc.fit(model, guide, loader, max_steps=1, progress=False)
