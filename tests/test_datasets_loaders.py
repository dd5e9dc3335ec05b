import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import pyro_bc
from pyro_bc import datasets
from pyro_bc.datasets import ImageData, RandomCropFlip, TensorBatches
from pyro_bc.models import LeNet300100


@pytest.fixture(scope="module")
def subset():
    return datasets.load_mnist_subset()


def toy(n=1000):
    x = torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    return x, torch.arange(n)  # labels are the indices, so batches reveal the order


# ----------------------------------------------------------------------------
# TensorBatches


def test_batches_cover_the_data_in_order_unshuffled():
    x, y = toy(1000)
    batches = TensorBatches(x, y, batch_size=128)
    assert len(batches) == 8 and len(batches.dataset) == 1000
    sizes = [len(b[1]) for b in batches]
    assert sizes == [128] * 7 + [104]
    assert torch.equal(torch.cat([b[0] for b in batches]), x)
    assert torch.equal(torch.cat([b[1] for b in batches]), y)


@pytest.mark.parametrize("batch_size", [128, 100])  # a partial last batch, and none
@pytest.mark.parametrize("explicit_generator", [False, True])
def test_same_order_and_random_state_as_dataloader(batch_size, explicit_generator):
    x, y = toy(1000)

    def run(make_loader):
        torch.manual_seed(7)
        generator = torch.Generator().manual_seed(3) if explicit_generator else None
        loader = make_loader(generator)
        orders = [torch.cat([b[1] for b in loader]) for _ in range(3)]
        after = generator.get_state() if explicit_generator else torch.get_rng_state()
        return orders, after, torch.randn(3)  # the global stream goes on the same way

    ours = run(lambda g: TensorBatches(x, y, batch_size, shuffle=True, generator=g))
    reference = run(
        lambda g: DataLoader(TensorDataset(x, y), batch_size, shuffle=True, generator=g)
    )
    for order, expected in zip(ours[0], reference[0], strict=True):
        assert torch.equal(order, expected)
    assert not torch.equal(ours[0][0], ours[0][1])  # reshuffled every epoch
    assert sorted(ours[0][0].tolist()) == list(range(1000))
    assert torch.equal(ours[1], reference[1])
    assert torch.equal(ours[2], reference[2])


def test_unshuffled_batches_use_the_random_stream_like_dataloader():
    x, y = toy(300)
    torch.manual_seed(0)
    list(DataLoader(TensorDataset(x, y), batch_size=64))
    expected = torch.get_rng_state()
    torch.manual_seed(0)
    list(TensorBatches(x, y, 64))
    assert torch.equal(torch.get_rng_state(), expected)


def test_transform_is_applied_to_every_batch():
    x, y = toy(10)
    batches = TensorBatches(x, y, 4, transform=lambda b: b * 2)
    assert torch.equal(torch.cat([b[0] for b in batches]), 2 * x)
    assert torch.equal(x, toy(10)[0])  # the stored tensor is untouched


def test_bad_arguments_are_named():
    x, y = toy(10)
    with pytest.raises(ValueError, match="batch_size"):
        TensorBatches(x, y, 0)
    with pytest.raises(ValueError, match="x has 10 examples but y has 9"):
        TensorBatches(x, y[:9])


def test_fit_gives_the_same_run_with_either_loader(subset):
    x, y = subset.train_x[:256], subset.train_y[:256]

    def train(make_loader):
        torch.manual_seed(0)
        model = LeNet300100(dataset_size=len(y))
        guide = pyro_bc.StructuredGuide(model)
        history = pyro_bc.fit(model, guide, make_loader(), epochs=2, lr=1e-2, progress=False)
        return history["loss"]

    losses = train(lambda: TensorBatches(x, y, 64, shuffle=True))
    assert losses == train(lambda: DataLoader(TensorDataset(x, y), 64, shuffle=True))


# ----------------------------------------------------------------------------
# Train/validation/test


def test_loaders_batch_shapes(subset):
    train_loader, test_loader = datasets.train_test_loaders(
        subset, batch_size=64, test_batch_size=500
    )
    x, y = next(iter(train_loader))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.int64
    assert len(train_loader) == 157  # ceil(10000 / 64)
    test_batches = list(test_loader)
    assert [len(b[1]) for b in test_batches] == [500] * 4
    assert torch.equal(torch.cat([b[1] for b in test_batches]), subset.test_y)


def test_loaders_shuffle_reproducibly(subset):
    def first_labels(seed):
        loader, _ = datasets.train_test_loaders(
            subset, generator=torch.Generator().manual_seed(seed)
        )
        return next(iter(loader))[1]

    assert torch.equal(first_labels(1), first_labels(1))
    assert not torch.equal(first_labels(1), first_labels(2))
    unshuffled, _ = datasets.train_test_loaders(subset, shuffle=False)
    assert torch.equal(next(iter(unshuffled))[1], subset.train_y[:128])


def test_train_validation_split_holds_out_the_last_training_images(subset):
    split = datasets.train_validation_split(subset, validation=2000)
    assert torch.equal(split.train_x, subset.train_x[:8000])
    assert torch.equal(split.validation_x, subset.train_x[8000:])
    assert torch.equal(split.validation_y, subset.train_y[8000:])
    assert split.test_x is subset.test_x and split.test_y is subset.test_y
    assert split.validation_x.data_ptr() == subset.train_x[8000:].data_ptr()  # a view


@pytest.mark.parametrize("validation", [0, 10_000, 20_000, -1, 2.5, True])
def test_train_validation_split_refuses_bad_sizes(subset, validation):
    with pytest.raises(ValueError, match=f"validation={validation!r}.*10000 training images"):
        datasets.train_validation_split(subset, validation=validation)


def test_train_validation_split_refuses_to_split_twice(subset):
    split = datasets.train_validation_split(subset, validation=1000)
    with pytest.raises(ValueError, match="already has a validation split"):
        datasets.train_validation_split(split, validation=1000)


def test_train_validation_test_loaders(subset):
    train, validation, test = datasets.train_validation_test_loaders(
        subset, validation=2500, batch_size=100, generator=torch.Generator().manual_seed(0)
    )
    assert (len(train.dataset), len(validation.dataset), len(test.dataset)) == (7500, 2500, 2000)
    assert len(train) == 75 and train.shuffle and not validation.shuffle
    assert torch.equal(torch.cat([b[1] for b in validation]), subset.train_y[7500:])
    assert torch.equal(torch.cat([b[1] for b in test]), subset.test_y)
    # an already split data set is used as it is
    split = datasets.train_validation_split(subset, validation=1000)
    loaders = datasets.train_validation_test_loaders(split)
    assert len(loaders.validation.dataset) == 1000


# ----------------------------------------------------------------------------
# RandomCropFlip


def window_matches(x, out, padding):
    """For every (top, left, flipped): which images of ``out`` are that window of ``x``."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    matches = {}
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            window = padded[:, :, top : top + h, left : left + w]
            for flipped in (False, True):
                candidate = window.flip(-1) if flipped else window
                matches[top, left, flipped] = (out == candidate).flatten(1).all(1)
    return matches


def test_crop_flip_draws_uniform_windows_and_fair_flips():
    n = 2000
    x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0)) + 0.5  # no zeros
    out = RandomCropFlip(padding=4, generator=torch.Generator().manual_seed(1))(x)
    assert out.shape == x.shape
    matches = window_matches(x, out, 4)
    hits = torch.stack(list(matches.values()))
    assert torch.equal(hits.sum(0), torch.ones(n, dtype=torch.long))  # exactly one window each
    flips = sum(m.sum() for (_, _, flipped), m in matches.items() if flipped)
    assert abs(int(flips) - n / 2) < 4 * (n / 4) ** 0.5  # Binomial(n, 1/2)
    counts = torch.tensor(
        [
            sum(int(matches[t, le, f].sum()) for f in (False, True))
            for t in range(9)
            for le in range(9)
        ],
        dtype=torch.float64,
    )
    expected = n / 81
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 160  # 80 degrees of freedom: mean 80, sd 12.6


def test_crop_flip_limits_and_seeds():
    x = torch.rand(16, 3, 32, 32)
    assert torch.equal(RandomCropFlip(padding=0, flip=0.0)(x), x)
    assert torch.equal(RandomCropFlip(padding=0, flip=1.0)(x), x.flip(-1))

    def augmented(seed):
        return RandomCropFlip(generator=torch.Generator().manual_seed(seed))(x)

    assert torch.equal(augmented(0), augmented(0))
    assert not torch.equal(augmented(0), augmented(1))
    with pytest.raises(ValueError, match="padding"):
        RandomCropFlip(padding=-1)
    with pytest.raises(ValueError, match="flip"):
        RandomCropFlip(flip=1.5)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        RandomCropFlip()(x[0])


def test_crop_flip_as_a_training_transform():
    x = torch.rand(10, 3, 32, 32)
    data = ImageData(x, torch.arange(10), x, torch.arange(10))
    augment = RandomCropFlip(generator=torch.Generator().manual_seed(0))
    train, test = datasets.train_test_loaders(data, batch_size=10, transform=augment)
    assert not torch.equal(next(iter(train))[0].sort(0).values, x.sort(0).values)
    assert torch.equal(next(iter(test))[0], x)  # test batches are never augmented
