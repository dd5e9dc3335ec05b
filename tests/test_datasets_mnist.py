import gzip
import hashlib
import json
import os
import tracemalloc
from pathlib import Path

import pytest
import torch

from pyro_bc import cli, datasets
from pyro_bc.datasets import mnist as mnist_files
from pyro_bc.datasets import storage
from pyro_bc.datasets.storage import STAMP_NAME, DataFileError

FULL_MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/mnist"
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def idx_bytes(magic: int, shape, payload: bytes | None = None) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in shape)
    if payload is None:
        payload = bytes(range(256)) * (torch.Size(shape).numel() // 256 + 1)
        payload = payload[: torch.Size(shape).numel()]
    return header + payload


def write_tiny_mnist(directory: Path, n_train=20, n_test=10) -> dict[str, bytes]:
    """Write synthetic files under the standard MNIST names; return their uncompressed bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    contents = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=generator)
        labels = torch.arange(n, dtype=torch.uint8) % 10
        for kind, tensor in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{split}-{kind}-ubyte"
            datasets.write_idx(directory / (name + ".gz"), tensor)
            contents[name] = gzip.decompress((directory / (name + ".gz")).read_bytes())
    return contents


@pytest.fixture
def tiny_checksums(monkeypatch, tmp_path):
    """Synthetic files in a 'mirror' directory, with their checksums patched in as standard."""
    mirror = tmp_path / "mirror"
    for name, raw in write_tiny_mnist(mirror).items():
        monkeypatch.setitem(mnist_files.MNIST_SHA256, name, hashlib.sha256(raw).hexdigest())
    return mirror


@pytest.fixture(autouse=True)
def isolated_data_dirs(monkeypatch, tmp_path):
    # Keep tests away from the user's real cache and PYRO_BC_DATA.
    monkeypatch.delenv(datasets.DATA_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture(scope="module")
def full_mnist():
    if not FULL_MNIST_DIR.is_dir():
        pytest.skip(f"full MNIST not found at {FULL_MNIST_DIR}")
    return datasets.load_mnist(FULL_MNIST_DIR, normalize=None)


@pytest.fixture(scope="module")
def subset():
    return datasets.load_mnist_subset(normalize=None)


# ----------------------------------------------------------------------------
# Shipped subset


def test_subset_shapes_and_dtypes(subset):
    assert subset.train_x.shape == (10000, 1, 28, 28)
    assert subset.test_x.shape == (2000, 1, 28, 28)
    assert subset.train_y.shape == (10000,)
    assert subset.test_y.shape == (2000,)
    assert subset.train_x.dtype == subset.test_x.dtype == torch.float32
    assert subset.train_y.dtype == subset.test_y.dtype == torch.int64


def test_subset_is_class_balanced(subset):
    assert subset.train_y.bincount(minlength=10).tolist() == [1000] * 10
    assert subset.test_y.bincount(minlength=10).tolist() == [200] * 10


def test_subset_classes_are_interleaved(subset):
    # Original MNIST order is kept, so the classes interleave rather than come in blocks.
    assert (subset.train_y[1:] != subset.train_y[:-1]).float().mean() > 0.8


@pytest.mark.parametrize(
    "normalize, low, high",
    [("symmetric", -1.0, 1.0), ("unit", 0.0, 1.0), (None, 0.0, 255.0), ("none", 0.0, 255.0)],
)
def test_subset_normalization(subset, normalize, low, high):
    mnist = datasets.load_mnist_subset(normalize=normalize)
    assert mnist.train_x.min() == low and mnist.train_x.max() == high
    assert mnist.test_x.min() == low and mnist.test_x.max() == high
    expected = subset.train_x / 255.0 * (high - low) + low
    torch.testing.assert_close(mnist.train_x, expected)


def test_default_normalization_is_symmetric(subset):
    mnist = datasets.load_mnist("subset")
    assert mnist.train_x.min() == -1.0 and mnist.train_x.max() == 1.0
    torch.testing.assert_close(mnist.train_x, subset.train_x / 127.5 - 1)


def test_bad_normalize_is_rejected():
    with pytest.raises(ValueError, match="normalize"):
        datasets.load_mnist_subset(normalize="zscore")


def test_subset_is_a_subset_of_mnist(subset, full_mnist):
    def label_by_image(images, labels):
        rows = images.squeeze(1).to(torch.uint8).numpy()
        return {row.tobytes(): label for row, label in zip(rows, labels.tolist(), strict=True)}

    for sub_x, sub_y, x, y in (
        (subset.train_x, subset.train_y, full_mnist.train_x, full_mnist.train_y),
        (subset.test_x, subset.test_y, full_mnist.test_x, full_mnist.test_y),
    ):
        in_mnist, in_subset = label_by_image(x, y), label_by_image(sub_x, sub_y)
        assert len(in_subset) == len(sub_y)  # no image drawn twice
        assert all(in_mnist.get(image) == label for image, label in in_subset.items())


def test_damaged_subset_fails_checksum(tmp_path, monkeypatch):
    for source in mnist_files._subset_dir().iterdir():
        (tmp_path / source.name).write_bytes(source.read_bytes())
    name = mnist_files.SUBSET_FILES["test_y"]
    damaged = datasets.read_idx(tmp_path / name)
    damaged[0] = (damaged[0] + 1) % 10  # still a valid IDX file, just not the shipped one
    datasets.write_idx(tmp_path / name, damaged)
    monkeypatch.setattr(mnist_files, "_subset_dir", lambda: tmp_path)
    with pytest.raises(DataFileError, match=name):
        datasets.load_mnist_subset()


# ----------------------------------------------------------------------------
# Full MNIST


def test_full_mnist_sizes_and_class_counts(full_mnist):
    assert full_mnist.train_x.shape == (60000, 1, 28, 28)
    assert full_mnist.test_x.shape == (10000, 1, 28, 28)
    assert full_mnist.train_y.bincount().tolist() == MNIST_TRAIN_COUNTS
    assert full_mnist.test_y.bincount().tolist() == MNIST_TEST_COUNTS
    assert full_mnist.train_x.min() == 0 and full_mnist.train_x.max() == 255


def test_full_mnist_files_match_standard_checksums(full_mnist):
    for name, digest in mnist_files.MNIST_SHA256.items():
        path = FULL_MNIST_DIR / (name + ".gz")
        assert hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest() == digest


def test_read_idx_reads_plain_and_gzip_alike(tmp_path):
    raw = idx_bytes(0x00000803, (3, 28, 28))
    (tmp_path / "plain").write_bytes(raw)
    # Misleading extensions on purpose: compression is detected from the content.
    (tmp_path / "zipped.idx").write_bytes(gzip.compress(raw))
    (tmp_path / "plain.gz").write_bytes(raw)
    expected = torch.tensor(list(raw[16:]), dtype=torch.uint8).reshape(3, 28, 28)
    for name in ("plain", "zipped.idx", "plain.gz"):
        assert torch.equal(datasets.read_idx(tmp_path / name), expected)


def test_write_idx_round_trip(tmp_path):
    labels = torch.tensor([3, 1, 4, 1, 5], dtype=torch.uint8)
    for compress in (True, False):
        path = tmp_path / f"labels-{compress}"
        datasets.write_idx(path, labels, compress=compress)
        assert torch.equal(datasets.read_idx(path), labels)
    assert not list(tmp_path.glob(".*.part"))


def test_read_idx_empty_file(tmp_path):
    (tmp_path / "empty").write_bytes(idx_bytes(0x00000803, (0, 28, 28)))
    assert datasets.read_idx(tmp_path / "empty").shape == (0, 28, 28)


def test_uncompressed_files_are_accepted(tmp_path):
    for name, raw in write_tiny_mnist(tmp_path / "gz").items():
        (tmp_path / name).write_bytes(raw)
    mnist = datasets.load_mnist(tmp_path, verify=False)
    assert mnist.train_x.shape == (20, 1, 28, 28) and mnist.test_y.shape == (10,)


# ----------------------------------------------------------------------------
# Malformed files


@pytest.mark.parametrize(
    "content, message",
    [
        (idx_bytes(0x00000803, (2, 28, 28))[:-5], "truncated"),
        (idx_bytes(0x00000803, (2, 28, 28)) + b"extra", "trailing bytes"),
        (idx_bytes(0x00000801, (10,), payload=bytes(3)), "truncated"),
        (idx_bytes(0x00000803, (2, 28, 28))[:10], "header"),
        (b"\x00\x00", "too short"),
        (idx_bytes(0x00000903, (2, 28, 28)), "magic"),
        (idx_bytes(0x00000D03, (2, 28, 28)), "magic"),
        (b"<html>Not found</html>", "magic"),
    ],
    ids=["truncated", "trailing", "short-labels", "short-header", "tiny", "float", "dtype", "html"],
)
def test_malformed_idx_raises_naming_file(tmp_path, content, message):
    for path, payload in (
        (tmp_path / "bad", content),
        (tmp_path / "bad.gz", gzip.compress(content)),
    ):
        path.write_bytes(payload)
        with pytest.raises(DataFileError, match=message) as info:
            datasets.read_idx(path)
        assert str(path) in str(info.value)
        assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_gzip_raises_naming_file(tmp_path, damage):
    zipped = bytearray(gzip.compress(idx_bytes(0x00000803, (4, 28, 28))))
    if damage == "truncate":
        zipped = zipped[: len(zipped) // 2]
    else:
        zipped[len(zipped) // 2] ^= 0xFF
    path = tmp_path / "images-idx3-ubyte.gz"
    path.write_bytes(bytes(zipped))
    with pytest.raises(ValueError, match="gzip") as info:
        datasets.read_idx(path)
    assert str(path) in str(info.value)


def test_swapped_files_are_reported(tmp_path):
    write_tiny_mnist(tmp_path)
    images, labels = (
        tmp_path / "train-images-idx3-ubyte.gz",
        tmp_path / "train-labels-idx1-ubyte.gz",
    )
    images.rename(tmp_path / "swap")
    labels.rename(images)
    (tmp_path / "swap").rename(labels)
    with pytest.raises(DataFileError, match="swapped"):
        datasets.load_mnist(tmp_path, verify=False)


def test_verify_catches_non_standard_local_file(tmp_path):
    write_tiny_mnist(tmp_path)
    datasets.load_mnist(tmp_path, verify=False)  # modified files on purpose
    with pytest.raises(DataFileError, match="checksum mismatch") as info:
        datasets.load_mnist(tmp_path)  # verified by default
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in str(info.value)
    assert "verify=False" in str(info.value)


# ----------------------------------------------------------------------------
# Lookup order and downloads (no network: mirrors are file:// URLs)


def test_missing_files_error_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        datasets.load_mnist(tmp_path / "nowhere")
    message = str(info.value)
    for hint in (str(tmp_path / "nowhere"), "DIR", datasets.DATA_ENV_VAR, "download=True"):
        assert hint in message


def test_lookup_order_root_then_env_then_cache(tmp_path, monkeypatch):
    cache = tmp_path / "xdg-cache" / "pyro_bc" / "mnist"
    env_dir, root_dir = tmp_path / "env", tmp_path / "root"
    write_tiny_mnist(cache, n_train=10)
    write_tiny_mnist(env_dir, n_train=20)
    write_tiny_mnist(root_dir, n_train=30)

    assert datasets.default_mnist_dir() == cache
    assert len(datasets.load_mnist(verify=False).train_y) == 10
    monkeypatch.setenv(datasets.DATA_ENV_VAR, str(env_dir))
    assert datasets.default_mnist_dir() == env_dir
    assert len(datasets.load_mnist(verify=False).train_y) == 20
    assert len(datasets.load_mnist("mnist", verify=False).train_y) == 20
    assert len(datasets.load_mnist(root_dir, verify=False).train_y) == 30
    assert len(datasets.load_mnist(str(root_dir), verify=False).train_y) == 30


def test_cache_dir_without_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert datasets.default_mnist_dir() == tmp_path / ".cache" / "pyro_bc" / "mnist"


def test_download_verifies_and_moves_into_place(tiny_checksums, tmp_path, monkeypatch):
    dead_mirror = (tmp_path / "dead").as_uri() + "/"
    good_mirror = tiny_checksums.as_uri() + "/"
    monkeypatch.setattr(mnist_files, "MNIST_MIRRORS", (dead_mirror, good_mirror))

    with pytest.raises(FileNotFoundError):
        datasets.load_mnist()
    mnist = datasets.load_mnist(download=True)
    cache = datasets.default_mnist_dir()
    # the four files and the stamp that remembers their verified checksums
    names = sorted(n + ".gz" for n in mnist_files.MNIST_SHA256)
    assert sorted(os.listdir(cache)) == sorted([*names, STAMP_NAME])
    for name in names:
        assert (cache / name).read_bytes() == (tiny_checksums / name).read_bytes()
    assert mnist.train_x.shape == (20, 1, 28, 28)
    assert datasets.load_mnist(verify=True).test_y.tolist() == mnist.test_y.tolist()


def test_download_fetches_only_missing_files(tiny_checksums, tmp_path):
    root = tmp_path / "partial"
    root.mkdir()
    kept = "train-images-idx3-ubyte.gz"
    (root / kept).write_bytes(b"left alone")
    datasets.download_mnist(root, mirrors=(tiny_checksums.as_uri() + "/",))
    assert (root / kept).read_bytes() == b"left alone"
    assert len(list(root.iterdir())) == 4


def test_checksum_mismatch_leaves_nothing_behind(tiny_checksums, tmp_path, monkeypatch):
    monkeypatch.setitem(mnist_files.MNIST_SHA256, "t10k-labels-idx1-ubyte", "0" * 64)
    root = tmp_path / "target"
    with pytest.raises(datasets.DataDownloadError, match="checksum mismatch") as info:
        datasets.download_mnist(root, mirrors=(tiny_checksums.as_uri() + "/",))
    assert "t10k-labels-idx1-ubyte.gz" in str(info.value)
    assert not (root / "t10k-labels-idx1-ubyte.gz").exists()
    assert not list(root.glob(".*"))  # no temporary files either


def test_unreachable_mirrors_report_every_url(tmp_path):
    mirrors = ((tmp_path / "a").as_uri() + "/", (tmp_path / "b").as_uri() + "/")
    with pytest.raises(datasets.DataDownloadError) as info:
        datasets.download_mnist(tmp_path / "target", mirrors=mirrors)
    assert all(m in str(info.value) for m in mirrors)
    assert not list((tmp_path / "target").iterdir())


# ----------------------------------------------------------------------------
# Hardening: decompression bombs, remembered checksums, conflicting copies, bad contents


def gzip_bomb(header: bytes, inflated_bytes: int) -> bytes:
    """A valid multi-member gzip file: ``header`` then ``inflated_bytes`` zeros, ~1000:1."""
    chunk = 16 << 20
    member = gzip.compress(bytes(chunk), compresslevel=9, mtime=0)
    return gzip.compress(header, mtime=0) + member * (inflated_bytes // chunk)


def test_gzip_bomb_fails_fast_with_bounded_memory(tmp_path):
    write_tiny_mnist(tmp_path)
    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    # A plausible header (60,000 images of 28x28), then 2 GiB where 47 MB belong.
    bomb.write_bytes(gzip_bomb(idx_bytes(0x00000803, (60000, 28, 28), payload=b""), 2 << 30))
    assert bomb.stat().st_size < 4_000_000
    tracemalloc.start()
    try:
        with pytest.raises(DataFileError, match="more than 47,040,016 bytes") as info:
            datasets.load_mnist(tmp_path, verify=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(bomb) in str(info.value)
    assert peak < 150 * 2**20  # about two copies of the 47 MB cap, not 2 GiB


def test_read_idx_cap(tmp_path):
    path = tmp_path / "labels-idx1-ubyte.gz"
    datasets.write_idx(path, torch.arange(10, dtype=torch.uint8))
    assert len(datasets.read_idx(path, max_bytes=18)) == 10  # 8 header bytes + 10 labels
    with pytest.raises(DataFileError, match="more than 17 bytes") as info:
        datasets.read_idx(path, max_bytes=17)
    assert str(path) in str(info.value)


def test_checksums_are_computed_once_and_remembered(tiny_checksums, monkeypatch):
    datasets.load_mnist(tiny_checksums)  # hashes every file and writes the stamp
    stamp = json.loads((tiny_checksums / STAMP_NAME).read_text())
    assert sorted(stamp) == sorted(n + ".gz" for n in mnist_files.MNIST_SHA256)
    for name, entry in stamp.items():
        assert entry["sha256"] == mnist_files.MNIST_SHA256[name.removesuffix(".gz")]
        assert entry["size"] == (tiny_checksums / name).stat().st_size
    assert not list(tiny_checksums.glob(".*.tmp"))  # written atomically

    def no_hashing(*args):
        raise AssertionError("hashed a file whose verdict is remembered")

    with monkeypatch.context() as patch:
        patch.setattr(storage.hashlib, "sha256", no_hashing)
        datasets.load_mnist(tiny_checksums)

    # A changed file (new size and modification time) is hashed again and caught.
    labels = tiny_checksums / "t10k-labels-idx1-ubyte.gz"
    datasets.write_idx(labels, torch.arange(9, dtype=torch.uint8))
    with pytest.raises(DataFileError, match="checksum mismatch") as info:
        datasets.load_mnist(tiny_checksums)
    assert str(labels) in str(info.value)


def test_read_only_data_folder_still_loads(tiny_checksums, monkeypatch):
    def read_only(*args):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(storage, "write_atomically", read_only)
    assert len(datasets.load_mnist(tiny_checksums).train_y) == 20  # verified, just not stamped
    assert not (tiny_checksums / STAMP_NAME).exists()


def test_damaged_stamp_is_ignored(tiny_checksums):
    (tiny_checksums / STAMP_NAME).write_text("{not json")
    assert len(datasets.load_mnist(tiny_checksums).train_y) == 20
    assert json.loads((tiny_checksums / STAMP_NAME).read_text())  # rewritten


def test_cli_data_path_verifies_and_remembers(tiny_checksums, tmp_path):
    assert len(cli.load_data(str(tiny_checksums), "mnist").train_y) == 20
    assert (tiny_checksums / STAMP_NAME).is_file()
    write_tiny_mnist(tmp_path / "other", n_train=30)  # not the (patched) standard files
    with pytest.raises(DataFileError, match="checksum mismatch"):  # main: one line, exit 2
        cli.load_data(str(tmp_path / "other"), "mnist")


def test_gz_and_plain_copies_must_agree(tiny_checksums):
    name = "train-labels-idx1-ubyte"
    raw = gzip.decompress((tiny_checksums / (name + ".gz")).read_bytes())
    (tiny_checksums / name).write_bytes(raw)
    assert len(datasets.load_mnist(tiny_checksums).train_y) == 20  # identical copies are fine

    (tiny_checksums / name).write_bytes(raw[:-1] + bytes([(raw[-1] + 1) % 10]))
    for verify in (True, False):
        with pytest.raises(DataFileError, match="different contents") as info:
            datasets.load_mnist(tiny_checksums, verify=verify)
        assert str(tiny_checksums / name) in str(info.value)
        assert str(tiny_checksums / (name + ".gz")) in str(info.value)


def test_empty_split_is_refused(tmp_path):
    write_tiny_mnist(tmp_path, n_test=0)
    with pytest.raises(DataFileError, match="test split is empty") as info:
        datasets.load_mnist(tmp_path, verify=False)
    assert str(tmp_path / "t10k-images-idx3-ubyte.gz") in str(info.value)
    assert str(tmp_path / "t10k-labels-idx1-ubyte.gz") in str(info.value)


def test_labels_out_of_range_are_refused(tmp_path):
    write_tiny_mnist(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    bad = datasets.read_idx(labels)
    bad[7] = 10
    datasets.write_idx(labels, bad)
    with pytest.raises(DataFileError, match="label 10 at index 7") as info:
        datasets.load_mnist(tmp_path, verify=False)
    assert str(labels) in str(info.value)
