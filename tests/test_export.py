import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

import pyro_bc
from pyro_bc import export
from pyro_bc.gather import Gather
from pyro_bc.nn import BayesianConv2d, BayesianLinear, BayesianNetwork

# PyTorch deprecates TorchScript, which to_torchscript exists for
pytestmark = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"
)

# conv1's filter 1 goes (and with it fc1's inputs 9..17); fc1's inputs 0, 20, 30 go, so a Gather
# sits in front of fc1; fc2's input 2 goes, which removes fc1's output 2
PRUNED = {"conv1": [1], "fc1": [0, 20, 30], "fc2": [2]}


def _compressed(bits="auto"):
    """A small CNN with a posterior set by hand (as tests/test_compress.py does), compressed."""
    model = BayesianNetwork(
        OrderedDict(
            conv1=BayesianConv2d(1, 4, 3, padding=1),
            relu1=nn.ReLU(),
            pool=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=BayesianLinear(36, 6),
            relu2=nn.LeakyReLU(0.1),
            fc2=BayesianLinear(6, 3),
        ),
        input_shape=(1, 6, 6),
    )
    guide = pyro_bc.StructuredGuide(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in guide.layers:
            (scale,) = layer.scale_factors
            scale.loc.copy_(1 + 0.2 * torch.randn(scale.loc.shape, generator=g))
            scale.log_var.fill_(-12.0)
            scale.log_var[PRUNED[layer.name]] = 2.0
            fan_in = math.prod(layer.weight.loc.shape[1:])
            layer.weight.loc.copy_(torch.randn(layer.weight.loc.shape, generator=g) / fan_in**0.5)
            layer.weight.log_var.uniform_(-14, -8, generator=g)
            layer.bias.loc.copy_(0.1 * torch.randn(layer.bias.loc.shape, generator=g))
    compressed = pyro_bc.compress(guide, thresholds=-3.0, bits=bits)
    assert any(isinstance(m, Gather) for m in compressed)
    assert compressed.report.architecture == "4-36-6 -> 3-24-5"
    return compressed


def _inputs(batch):
    return torch.randn(batch, 1, 6, 6, generator=torch.Generator().manual_seed(batch))


@pytest.mark.parametrize("bits", ["auto", None])
def test_onnx_runs_in_onnxruntime_and_matches_pytorch(tmp_path, bits):
    ort = pytest.importorskip("onnxruntime")
    compressed = _compressed(bits)
    path = tmp_path / "net.onnx"
    size = export.to_onnx(compressed, path)
    assert size == path.stat().st_size > 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("input", "logits")
    assert inp.shape[1:] == [1, 6, 6] and isinstance(inp.shape[0], str)  # dynamic batch
    for batch in (1, 2, 13):
        x = _inputs(batch)
        (logits,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            expected = compressed(x)
        torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=0, atol=1e-5)


def test_torchscript_loads_and_matches_pytorch(tmp_path):
    compressed = _compressed()
    path = tmp_path / "net.pt"
    size = export.to_torchscript(compressed, path)
    assert size == path.stat().st_size > 0
    scripted = torch.jit.load(str(path))
    for batch in (1, 13):
        x = _inputs(batch)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), compressed(x), rtol=0, atol=1e-5)


def test_export_file_reads_a_bc_file_and_writes_both(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    compressed = _compressed()
    compressed.save(tmp_path / "net.bc")
    written = export.export_file(
        tmp_path / "net.bc", onnx=tmp_path / "out" / "net.onnx", torchscript=tmp_path / "net.pt"
    )
    assert set(written) == {tmp_path / "out" / "net.onnx", tmp_path / "net.pt"}
    x = _inputs(5)
    with torch.no_grad():
        expected = compressed(x)
        torch.testing.assert_close(
            torch.jit.load(str(tmp_path / "net.pt"))(x), expected, rtol=0, atol=1e-5
        )
    session = ort.InferenceSession(str(tmp_path / "out" / "net.onnx"))
    (logits,) = session.run(None, {"input": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=0, atol=1e-5)
    # only the two files and the .bc: no temporary left behind
    names = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert names == ["net.bc", "net.onnx", "net.pt"]


def test_bad_requests_are_named_and_write_nothing(tmp_path):
    with pytest.raises(ValueError, match="onnx=PATH and/or torchscript=PATH"):
        export.export_file(tmp_path / "net.bc")
    (tmp_path / "broken.bc").write_bytes(b"not a compressed network")
    with pytest.raises(ValueError, match="broken.bc"):
        export.export_file(tmp_path / "broken.bc", onnx=tmp_path / "net.onnx")
    with pytest.raises(ValueError, match="input_shape"):
        export.to_onnx(nn.Sequential(nn.Linear(3, 2)), tmp_path / "net.onnx")
    with pytest.raises(TypeError, match="expected a network"):
        export.to_torchscript("net.bc", tmp_path / "net.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.bc"]


def test_a_plain_network_with_an_input_shape(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    network = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.Tanh(), nn.Linear(4, 2))
    export.to_onnx(network, tmp_path / "net.onnx", input_shape=(3, 4))
    x = torch.randn(3, 3, 4)
    (logits,) = ort.InferenceSession(str(tmp_path / "net.onnx")).run(None, {"input": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), network(x), rtol=0, atol=1e-5)
