from collections import OrderedDict

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import pyro_bc
from pyro_bc.checkpoint import (
    SCHEMA_VERSION,
    CheckpointError,
    _digest,
    load_checkpoint,
    save_checkpoint,
)
from pyro_bc.nn import BayesianLinear, BayesianNetwork


def _guide(in_features=4, seed=0):
    torch.manual_seed(seed)
    model = BayesianNetwork(OrderedDict(fc1=BayesianLinear(in_features, 3)), dataset_size=32)
    return model, pyro_bc.StructuredGuide(model)


def _saved(tmp_path, name="run.pt", epoch=2, **kwargs):
    _, guide = _guide()
    optimizer = torch.optim.Adam(guide.parameters(), lr=0.01)
    path = tmp_path / name
    history = [{"epoch": i + 1, "loss": 1.5} for i in range(epoch)]
    save_checkpoint(path, guide, optimizer, epoch, history, {"model": "tiny"}, **kwargs)
    return path, guide


def _rewrite(path, change, sign=True):
    """Changes a checkpoint's contents and, with ``sign``, gives it a valid digest again, so the
    schema check (not the digest) has to catch the change."""
    state = torch.load(path, weights_only=True)
    change(state)
    if sign:
        state["sha256"] = _digest({k: v for k, v in state.items() if k != "sha256"}, path)
    torch.save(state, path)


def test_round_trip_checks_version_digest_and_shapes(tmp_path):
    path, guide = _saved(tmp_path)
    state = load_checkpoint(path, guide, epochs=2)
    assert state["version"] == SCHEMA_VERSION and len(state["sha256"]) == 64
    assert state["epoch"] == 2 and state["metadata"] == {"model": "tiny"}
    assert state["rng"]["cpu"].dtype == torch.uint8
    for name, value in guide.state_dict().items():
        assert torch.equal(state["guide"][name], value)
    # a plain torch.load without pickle reads it too
    assert "guide" in torch.load(path, weights_only=True)


def test_a_flipped_bit_fails_the_digest(tmp_path):
    path, guide = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    weight = guide.state_dict()["layers.0.weight.loc"].numpy().tobytes()
    offset = data.find(weight)
    assert offset > 0
    data[offset + len(weight) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"run.pt fails its SHA-256 check"):
        load_checkpoint(path)


def test_a_truncated_file_names_the_file(tmp_path):
    path, _ = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"run.pt cannot be read.*truncated"):
        load_checkpoint(path)
    with pytest.raises(IsADirectoryError, match="is a directory; pass the checkpoint file"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    path, _ = _saved(tmp_path)
    _, other = _guide(in_features=5)
    with pytest.raises(CheckpointError, match=r"run.pt is not of this model.*\(3, 5\)"):
        load_checkpoint(path, other)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.update(epoch=-1), "'epoch' must be a non-negative integer"),
        (lambda s: s.update(epoch=2.0), "'epoch' must be a non-negative integer"),
        (lambda s: s.update(history=s["history"][:1]), "1 records for epoch 2"),
        (lambda s: s["rng"].update(cpu=s["rng"]["cpu"].float()), "uint8 .*got torch.float32"),
        (lambda s: s["rng"].update(cuda=[torch.zeros(3)]), "cuda random state must be"),
        (lambda s: s.update(guide={"w": [1.0]}), "'guide' must map names to tensors"),
        (lambda s: s.update(optimizer={"lr": 1}), "'optimizer' is not an optimizer"),
        (lambda s: s.update(metadata=[1]), "'metadata' must be a dict"),
    ],
)
def test_schema_errors_name_the_file_and_the_field(tmp_path, change, message):
    path, _ = _saved(tmp_path)
    _rewrite(path, change)
    with pytest.raises(CheckpointError, match=f"run.pt.*{message}"):
        load_checkpoint(path)


def test_epoch_out_of_range_and_newer_schema(tmp_path):
    path, _ = _saved(tmp_path, epoch=3)
    with pytest.raises(CheckpointError, match=r"run.pt is at epoch 3, past epochs=2"):
        load_checkpoint(path, epochs=2)
    _rewrite(path, lambda s: s.update(version=SCHEMA_VERSION + 1))
    with pytest.raises(CheckpointError, match=r"schema version 2.*upgrade pyro_bc"):
        load_checkpoint(path)
    _rewrite(path, lambda s: s.update(format="something else"))
    with pytest.raises(CheckpointError, match="not a pyro_bc checkpoint"):
        load_checkpoint(path)


def test_no_checkpoint_of_non_finite_parameters_and_plain_metadata_only(tmp_path):
    path, guide = _saved(tmp_path)
    before = path.read_bytes()
    with torch.no_grad():
        guide.layers[0].weight.loc[0, 0] = float("inf")
    optimizer = torch.optim.Adam(guide.parameters())
    with pytest.raises(ValueError, match=r"not writing checkpoint .*run.pt.*layers.0.weight.loc"):
        save_checkpoint(path, guide, optimizer, 3, [{}] * 3)
    assert path.read_bytes() == before
    _, guide = _guide()
    with pytest.raises(TypeError, match=r"\['metadata'\]\['classes'\] is a set"):
        save_checkpoint(path, guide, optimizer, 0, [], {"classes": {1, 2}})
    assert path.read_bytes() == before


def test_keep_last_keeps_older_copies(tmp_path):
    _, guide = _guide()
    optimizer = torch.optim.Adam(guide.parameters())
    path = tmp_path / "run.pt"
    for epoch in range(1, 5):
        history = [{}] * epoch
        save_checkpoint(path, guide, optimizer, epoch, history, keep_last=2)
    copies = (path, tmp_path / "run.pt.1", tmp_path / "run.pt.2")
    epochs = [load_checkpoint(p)["epoch"] for p in copies]
    assert epochs == [4, 3, 2]
    assert not (tmp_path / "run.pt.3").exists()


def _legacy(path):
    """What fit wrote before the schema: no format, version or digest; rng a bare ByteTensor."""
    state = torch.load(path, weights_only=True)
    legacy = {k: state[k] for k in ("guide", "optimizer", "epoch", "history", "metadata")}
    legacy["rng"] = state["rng"]["cpu"]
    torch.save(legacy, path)


def test_a_version_0_checkpoint_loads_and_resumes_bit_for_bit(tmp_path):
    data = torch.randn(64, 4), torch.randint(0, 3, (64,))

    def run(epochs, checkpoint=None, resume=False, seed=0):
        model, guide = _guide(seed=seed)
        loader = DataLoader(TensorDataset(*data), batch_size=16, shuffle=True)
        pyro_bc.fit(
            model,
            guide,
            loader,
            epochs=epochs,
            seed=1,
            progress=False,
            checkpoint=checkpoint,
            resume=resume,
        )
        return guide

    uninterrupted = run(2).state_dict()
    path = tmp_path / "old.pt"
    run(1, path)
    _legacy(path)
    state = load_checkpoint(path)
    assert state["version"] == 0 and state["rng"]["cuda"] == []
    resumed = run(2, path, resume=True, seed=7).state_dict()
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name
    assert load_checkpoint(path)["version"] == SCHEMA_VERSION  # rewritten in the new schema

    run(1, path)
    _legacy(path)
    _, other = _guide(in_features=5)
    with pytest.raises(CheckpointError, match="old.pt is not of this model"):
        load_checkpoint(path, other)
    _rewrite(path, lambda s: s.update(rng=s["rng"].float()), sign=False)
    with pytest.raises(CheckpointError, match="old.pt .*version 0.*uint8"):
        load_checkpoint(path)


def test_tensors_go_to_the_guides_device(tmp_path):
    path, _ = _saved(tmp_path)
    _, guide = _guide()
    guide.to(torch.float64)
    state = load_checkpoint(path, guide)
    assert all(v.dtype == torch.float64 for v in state["guide"].values())
    _, meta_guide = _guide()
    meta_guide.to("meta")
    state = load_checkpoint(path, meta_guide)
    assert all(v.device.type == "meta" for v in state["guide"].values())
