import hashlib
import json
import math
import os
from collections import OrderedDict

import numpy as np
import pytest
import safetensors.numpy
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import pyro_bc
from pyro_bc.codec import CompressedFileError, pack_bits, unpack_bits
from pyro_bc.compressed import CompressedNetwork
from pyro_bc.models import LeNet5Caffe, LeNet300100
from pyro_bc.nn import BayesianConv2d, BayesianLinear, BayesianNetwork


def decode(data, source="<bytes>", **kwargs):
    return CompressedNetwork.from_bytes(data, source, **kwargs)


def encode(network):
    return network.to_bytes()


def _compressed(network, pruned, bits="auto", seed=0):
    torch.manual_seed(seed)
    guide = pyro_bc.StructuredGuide(network())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in guide.layers:
            (scale,) = layer.scale_factors
            scale.log_var[list(pruned.get(layer.name, []))] = 2.0
            layer.weight.log_var.uniform_(-14, -6, generator=g)
            if layer.bias is not None:
                layer.bias.loc.normal_(0, 0.1, generator=g)
    return pyro_bc.compress(guide, bits=bits)


def _small_chain():
    return BayesianNetwork(
        OrderedDict(
            conv=BayesianConv2d(1, 3, 3, padding=1),
            relu=nn.ReLU(),
            pool=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=BayesianLinear(3 * 3 * 3, 5),
            act=nn.LeakyReLU(0.2),
            fc2=BayesianLinear(5, 2),
        ),
        input_shape=(1, 6, 6),
    )


SMALL_PRUNED = {"conv": [1], "fc1": [0, 2, 20], "fc2": [3]}


@pytest.fixture(scope="module")
def small():
    network = _compressed(_small_chain, SMALL_PRUNED)
    return network, network.to_bytes(), torch.randn(3, 1, 6, 6)


@pytest.mark.parametrize(
    "network, pruned, bits",
    [
        (LeNet300100, {"fc1": range(0, 784, 2), "fc2": [1, 2, 3], "fc3": [0]}, "auto"),
        (LeNet5Caffe, {"conv1": [0], "conv2": [5, 6], "fc1": range(0, 800, 5)}, "auto"),
        (LeNet300100, {"fc2": [4]}, None),
        (LeNet300100, {}, 23),
    ],
)
def test_save_and_load_give_bit_identical_outputs(tmp_path, network, pruned, bits):
    compressed = _compressed(network, pruned, bits)
    path = tmp_path / "net.bc"
    size = compressed.save(path)
    assert size == path.stat().st_size == compressed.report.file_bytes
    assert os.listdir(tmp_path) == ["net.bc"]  # the temporary file was renamed
    loaded = pyro_bc.load(path)
    assert isinstance(loaded, pyro_bc.CompressedNetwork)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), compressed(x))
    assert loaded.formats == compressed.formats
    assert loaded.input_shape == compressed.input_shape
    assert loaded.to_bytes() == path.read_bytes()  # saving again writes the same file


def test_file_is_a_safetensors_container(small):
    network, data, _ = small
    tensors = safetensors.numpy.load(data)
    assert set(tensors) == {
        "conv.weight",
        "conv.bias",
        "fc1_gather.mask",
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
    }
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert header["__metadata__"]["format"] == "pyro_bc.compressed"
    # weights are packed at exactly the layer's width
    spec = {m["name"]: m for m in json.loads(header["__metadata__"]["network"])["modules"]}
    fc1 = spec["fc1"]
    count = fc1["in_features"] * fc1["out_features"]
    assert tensors["fc1.weight"].size == math.ceil(count * fc1["width"] / 8)
    assert tensors["fc1.bias"].dtype == np.float32


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 32).flatmap(
        lambda width: st.tuples(
            st.just(width),
            st.lists(st.integers(-(2 ** (width - 1)), 2 ** (width - 1) - 1), max_size=40),
        )
    )
)
def test_bit_packing_round_trips(case):
    width, values = case
    q = np.array(values, dtype=np.int64)
    packed = pack_bits(q, width)
    assert len(packed) == math.ceil(len(values) * width / 8)
    assert unpack_bits(packed, len(values), width).tolist() == values


def test_bit_packing_is_msb_first_twos_complement():
    assert pack_bits(np.array([1, -3]), 3) == bytes([0b00110100])


def _assert_clean_error_or_same_network(data, network, x, source="corrupt.bc"):
    try:
        loaded = decode(data, source=source)
    except CompressedFileError as e:
        assert source in str(e)
        return
    # Only meaning-preserving changes (e.g. header padding) can load: the checksum covers the rest
    with torch.no_grad():
        assert torch.equal(loaded(x), network(x))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_corrupted_bytes_give_a_clean_error(small, data):
    network, raw, x = small
    corrupted = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(raw) - 1))
        corrupted[position] = data.draw(st.integers(0, 255))
    _assert_clean_error_or_same_network(bytes(corrupted), network, x)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_truncated_or_extended_files_give_a_clean_error(small, data):
    network, raw, x = small
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(CompressedFileError, match="corrupt.bc"):
        decode(raw[:cut], source="corrupt.bc")
    tail = data.draw(st.binary(min_size=1, max_size=16))
    with pytest.raises(CompressedFileError):
        decode(raw + tail, source="corrupt.bc")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_give_a_clean_error(data):
    with pytest.raises(CompressedFileError):
        decode(data)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_random_header_gives_a_clean_error(header):
    with pytest.raises(CompressedFileError):
        decode(len(header).to_bytes(8, "little") + header)


def _rebuild(raw, edit_network=None, edit_header=None, rehash=True):
    """Edits a file's header like an attacker would: keeping the checksum valid."""
    size = int.from_bytes(raw[:8], "little")
    header, buffer = json.loads(raw[8 : 8 + size]), raw[8 + size :]
    metadata = header["__metadata__"]
    if edit_network is not None:
        network = json.loads(metadata["network"])
        edit_network(network)
        metadata["network"] = json.dumps(network)
    if edit_header is not None:
        edit_header(header)
    if rehash:
        text = metadata["network"].encode() + buffer
        metadata["sha256"] = hashlib.sha256(text).hexdigest()
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + buffer


def _module(network, name):
    return next(m for m in network["modules"] if m["name"] == name)


def _set(module, **fields):
    return lambda network: _module(network, module).update(fields)


HOSTILE = {
    "huge linear": (dict(edit_network=_set("fc2", in_features=2**30, out_features=2**30)), "fc2"),
    "huge tensor": (
        dict(edit_header=lambda h: h["fc2.weight"].update(shape=[2**40])),
        "fc2.weight",
    ),
    "tensor beyond the data": (
        dict(edit_header=lambda h: h["fc2.weight"].update(data_offsets=[0, 2**62])),
        "outside",
    ),
    "wrong dtype": (dict(edit_header=lambda h: h["fc1.bias"].update(dtype="F64")), "F64"),
    "unknown module": (
        dict(edit_network=lambda n: n["modules"].insert(0, {"name": "x", "type": "Exec"})),
        "'Exec'",
    ),
    "dotted type": (dict(edit_network=_set("relu", type="os.system")), "os.system"),
    "pickle in a field": (dict(edit_network=_set("fc2", bias="cos\nsystem\n")), "bias"),
    "extra field": (dict(edit_network=_set("relu", inplace=True)), "relu"),
    "bad frac bits": (dict(edit_network=_set("fc1", frac_bits=99)), "frac_bits"),
    "bad width": (dict(edit_network=_set("fc1", width=0)), "width"),
    "bool as size": (dict(edit_network=_set("fc2", out_features=True)), "out_features"),
    "huge input": (dict(edit_network=lambda n: n.update(input_shape=[2**20] * 3)), "input_shape"),
    "huge padding": (dict(edit_network=_set("conv", padding=[2**20, 2**20])), "conv"),
    "pool too big": (dict(edit_network=_set("pool", kernel_size=[50, 50])), "pool"),
    "nan slope": (dict(edit_network=_set("act", negative_slope=float("nan"))), "JSON"),
    "shapes do not chain": (
        dict(edit_network=_set("pool", kernel_size=[1, 1], stride=[1, 1])),
        "fc1_gather",
    ),
    "duplicate names": (dict(edit_network=_set("act", name="relu")), "relu"),
    "unexpected tensor": (
        dict(
            edit_header=lambda h: h.update(
                extra={"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
            )
        ),
        "extra",
    ),
    "wrong version": (
        dict(edit_header=lambda h: h["__metadata__"].update(version="2")),
        "version",
    ),
    "swapped offsets": (
        dict(
            edit_header=lambda h: (
                h["fc1.bias"].update(data_offsets=h["conv.bias"]["data_offsets"]),
            )
        ),
        "bias",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers_give_a_clean_error(small, case):
    _, raw, _ = small
    edits, match = HOSTILE[case]
    with pytest.raises(CompressedFileError, match=match):
        decode(_rebuild(raw, **edits), source="hostile.bc")


def test_lying_header_length_and_checksum(small):
    network, raw, x = small
    huge = (2**63).to_bytes(8, "little") + raw[8:]
    with pytest.raises(CompressedFileError, match="claims"):
        decode(huge)
    flipped = bytearray(raw)
    flipped[-1] ^= 1  # one weight bit
    with pytest.raises(CompressedFileError, match="checksum"):
        decode(bytes(flipped))
    # an edit that keeps the JSON valid but changes the meaning is caught by the checksum
    edited = _rebuild(raw, edit_network=_set("fc1", frac_bits=3), rehash=False)
    with pytest.raises(CompressedFileError, match="checksum"):
        decode(edited)
    nested = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(CompressedFileError, match="JSON"):
        decode(len(nested).to_bytes(8, "little") + nested)
    duplicate = b'{"a": 1, "a": 2}'
    with pytest.raises(CompressedFileError, match="duplicate"):
        decode(len(duplicate).to_bytes(8, "little") + duplicate)


def test_load_names_the_file(tmp_path, small):
    _, raw, _ = small
    path = tmp_path / "broken.bc"
    path.write_bytes(raw[:100])
    with pytest.raises(CompressedFileError, match="broken.bc"):
        pyro_bc.load(path)
    with pytest.raises(FileNotFoundError, match="missing.bc"):
        pyro_bc.load(tmp_path / "missing.bc")
    with pytest.raises(IsADirectoryError, match="is a directory; pass the .bc file"):
        pyro_bc.load(tmp_path)


def test_save_refuses_what_it_cannot_store(small):
    network, _, _ = small
    changed = decode(encode(network))
    with torch.no_grad():
        changed.fc1.weight.add_(1e-7)
    with pytest.raises(ValueError, match="fc1"):
        encode(changed)
    extra = decode(encode(network))
    extra.add_module("softmax", nn.Softmax(-1))
    with pytest.raises(ValueError, match="Softmax"):
        encode(extra)
