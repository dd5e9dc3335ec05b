import hashlib
import io
import tarfile

import pytest
import torch

from pyro_bc import datasets
from pyro_bc.datasets import DataDownloadError, DataFileError, cifar10

TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]


def records(images: torch.Tensor, labels: torch.Tensor) -> bytes:
    """The official layout: per image one label byte, then 3x32x32 pixels channel-major."""
    rows = torch.cat([labels.view(-1, 1), images.reshape(len(labels), -1)], dim=1)
    return rows.to(torch.uint8).numpy().tobytes()


def write_cifar(root, per_file=4, seed=0):
    """Small batch files in the official layout; returns the uint8 images and labels."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    written = {}
    for name in [*TRAIN_FILES, "test_batch.bin"]:
        shape = (per_file, 3, 32, 32)
        images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, 10, shape[:1], dtype=torch.uint8, generator=generator)
        (folder / name).write_bytes(records(images, labels))
        written[name] = (images, labels)
    return written


def test_reads_the_official_layout(tmp_path):
    written = write_cifar(tmp_path)
    cifar = datasets.load_cifar10(tmp_path, normalize=None)
    assert cifar.train_x.shape == (20, 3, 32, 32) and cifar.train_x.dtype == torch.float32
    assert cifar.test_y.shape == (4,) and cifar.test_y.dtype == torch.int64
    assert torch.equal(cifar.train_x, torch.cat([written[n][0] for n in TRAIN_FILES]).float())
    assert torch.equal(cifar.train_y, torch.cat([written[n][1] for n in TRAIN_FILES]).long())
    assert torch.equal(cifar.test_x, written["test_batch.bin"][0].float())
    # the folder holding the batch files works as root too
    inner = datasets.load_cifar10(tmp_path / "cifar-10-batches-bin")
    assert torch.equal(inner.test_y, cifar.test_y)


def test_pixel_bytes_are_channel_major_rows(tmp_path):
    record = bytearray(cifar10.RECORD_BYTES)
    record[0] = 7
    record[1 + 0 * 1024 + 0 * 32 + 5] = 11  # red, row 0, column 5
    record[1 + 1 * 1024 + 2 * 32 + 3] = 22  # green, row 2, column 3
    record[1 + 2 * 1024 + 31 * 32 + 31] = 33  # blue, last pixel
    path = tmp_path / "one.bin"
    path.write_bytes(bytes(record))
    images, labels = datasets.read_cifar10_batch(path)
    assert labels.tolist() == [7]
    assert images[0, 0, 0, 5] == 11 and images[0, 1, 2, 3] == 22 and images[0, 2, 31, 31] == 33
    assert int(images.sum()) == 66


def test_channel_normalisation_uses_training_statistics(tmp_path):
    write_cifar(tmp_path, per_file=20)
    raw = datasets.load_cifar10(tmp_path, normalize=None)
    cifar = datasets.load_cifar10(tmp_path)  # "channel" by default
    train = raw.train_x.double()
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
    torch.testing.assert_close(cifar.train_x.double(), (train - mean) / std, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        cifar.test_x.double(), (raw.test_x.double() - mean) / std, atol=1e-5, rtol=0
    )
    # bytes 0..255 map to [0, 1] and to [-1, 1]
    unit = datasets.load_cifar10(tmp_path, normalize="unit")
    torch.testing.assert_close(unit.test_x, raw.test_x / 255)
    symmetric = datasets.load_cifar10(tmp_path, normalize="symmetric")
    torch.testing.assert_close(symmetric.train_x, raw.train_x / 127.5 - 1)
    with pytest.raises(ValueError, match="normalize='zscore'"):
        datasets.load_cifar10(tmp_path, normalize="zscore")


def damage(path, how):
    content = bytearray(path.read_bytes())
    if how == "truncated":
        content = content[:-100]
    elif how == "empty":
        content = b""
    elif how == "label":
        content[cifar10.RECORD_BYTES * 2] = 10
    path.write_bytes(bytes(content))


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated", "not a whole number of 3,073-byte records"),
        ("empty", "empty file"),
        ("label", "label 10 in record 2"),
    ],
)
def test_bad_batch_files_are_named(tmp_path, how, message):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    damage(path, how)
    with pytest.raises(DataFileError, match=message) as info:
        datasets.load_cifar10(tmp_path)
    assert str(path) in str(info.value)
    assert "download" in str(info.value)


def test_oversized_batch_file_is_refused(tmp_path, monkeypatch):
    write_cifar(tmp_path)
    monkeypatch.setattr(cifar10, "RECORDS_PER_FILE", 3)
    with pytest.raises(DataFileError, match="4 records, more than the 3") as info:
        datasets.load_cifar10(tmp_path)
    assert "data_batch_1.bin" in str(info.value)


def test_missing_files_say_where_and_how(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-bin" / "test_batch.bin").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch.bin") as info:
        datasets.load_cifar10(tmp_path)
    assert str(tmp_path) in str(info.value) and "download=True" in str(info.value)


# ----------------------------------------------------------------------------
# Download and extraction (no network: the archive is a file:// URL)


def make_archive(path, members: dict[str, bytes], links=()):
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for name, target in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def official_archive(tmp_path, monkeypatch):
    """A small archive in the official layout (plus an extra member), its MD5 patched in."""
    source = tmp_path / "source"
    written = write_cifar(source)
    folder = source / "cifar-10-batches-bin"
    members = {f"cifar-10-batches-bin/{p.name}": p.read_bytes() for p in folder.iterdir()}
    members["cifar-10-batches-bin/readme.html"] = b"<html></html>"
    members["cifar-10-batches-bin/../../escaped.bin"] = b"never extracted"
    archive = tmp_path / "server" / "cifar-10-binary.tar.gz"
    archive.parent.mkdir()
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", make_archive(archive, members))
    return archive, written


def test_download_checks_md5_and_extracts_the_batches(tmp_path, official_archive):
    archive, written = official_archive
    root = tmp_path / "data"
    folder = datasets.download_cifar10(root, url=archive.as_uri())
    assert folder == root / "cifar-10-batches-bin"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*TRAIN_FILES, "test_batch.bin"])
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-bin"]  # archive gone
    assert not list(tmp_path.rglob("escaped.bin"))  # only the six batch files are extracted
    cifar = datasets.load_cifar10(root, normalize=None)
    assert torch.equal(cifar.test_y, written["test_batch.bin"][1].long())


def test_load_with_download_uses_the_official_url(tmp_path, official_archive, monkeypatch):
    archive, _ = official_archive
    assert cifar10.CIFAR10_URL == "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
    monkeypatch.setattr(cifar10, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError):
        datasets.load_cifar10()
    assert len(datasets.load_cifar10(download=True).train_y) == 20
    assert (tmp_path / "cache" / "pyro_bc" / "cifar10" / "cifar-10-batches-bin").is_dir()


def test_wrong_md5_leaves_nothing_behind(tmp_path, official_archive, monkeypatch):
    archive, _ = official_archive
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", "0" * 32)
    root = tmp_path / "data"
    with pytest.raises(DataDownloadError, match="checksum mismatch") as info:
        datasets.download_cifar10(root, url=archive.as_uri())
    assert archive.as_uri() in str(info.value)
    assert list(root.iterdir()) == []


def test_oversized_download_is_cut_off(tmp_path, official_archive, monkeypatch):
    archive, _ = official_archive
    monkeypatch.setattr(cifar10, "CIFAR10_ARCHIVE_BYTES", 1000)
    root = tmp_path / "data"
    with pytest.raises(DataDownloadError, match="more than 1,000 bytes"):
        datasets.download_cifar10(root, url=archive.as_uri())
    assert list(root.iterdir()) == []


def test_unsafe_archive_members_are_refused(tmp_path, monkeypatch):
    members = {f"cifar-10-batches-bin/{name}": b"x" for name in TRAIN_FILES}
    archive = tmp_path / "evil.tar.gz"
    md5 = make_archive(
        archive, members, links=[("cifar-10-batches-bin/test_batch.bin", "/etc/passwd")]
    )
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", md5)
    root = tmp_path / "data"
    with pytest.raises(DataFileError, match="not a plain file") as info:
        datasets.download_cifar10(root, url=archive.as_uri())
    assert "test_batch.bin" in str(info.value)
    assert not (root / "cifar-10-batches-bin" / "test_batch.bin").exists()
    assert not (root / "cifar-10-binary.tar.gz").exists()
