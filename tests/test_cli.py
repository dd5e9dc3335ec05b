import json
import shutil
from pathlib import Path

import pytest
import torch

import pyro_bc
from pyro_bc import cli
from pyro_bc.cli import main, parse_thresholds
from pyro_bc.compression import compress_retrained
from pyro_bc.datasets import write_idx
from pyro_bc.models import Recipe, recipes

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    status = main(
        ["run", "--epochs", "1", "--pretrain-epochs", "1", "--mc-samples", "0", "--out", str(out)]
    )
    assert status == 0
    return out


@pytest.fixture(scope="module")
def vgg_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("vgg")
    argv = ["run", "--model", "vgg16", "--data", "synthetic-cifar10", "--width", "4"]
    argv += ["--epochs", "1", "--pretrain-epochs", "1", "--mc-samples", "2", "--no-figures"]
    argv += ["--quiet", "--out", str(out)]
    assert main(argv) == 0
    return out


def test_run_writes_checkpoint_compressed_file_and_report(run_folder, capsys):
    summary = json.loads((run_folder / "summary.json").read_text())
    report = json.loads((run_folder / "report.json").read_text())
    assert (run_folder / "checkpoint.pt").is_file()
    assert (run_folder / "model.bc").stat().st_size == report["file_bytes"]
    for figure in ("pruning-histograms", "weights", "bits", "training"):
        assert (run_folder / f"{figure}.png").stat().st_size > 0
    assert summary["architecture"] == report["architecture"]
    assert 0 <= summary["test_error_compressed"] < 0.5
    # the shipped subset's last fifth is held out: trained on 8,000 of its 10,000 images
    assert summary["validation"] == 2000 and summary["dataset_size"] == 8000
    # options not given come from the recipe
    r = recipes.recipe("lenet300", "gnj", data="subset")
    assert (summary["lr"], summary["decay_epochs"]) == (r.lr, r.decay_epochs)


def test_evaluate_reads_back_the_stated_error(run_folder, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(run_folder / "model.bc")]) == 0
    result = json.loads(capsys.readouterr().out)
    report = json.loads((run_folder / "report.json").read_text())
    # the same network on the same images: the same count of errors
    assert result["n"] == report["test_examples"]
    assert round(result["error"] * result["n"]) == round(report["test_error"] * result["n"])


def test_compress_a_checkpoint_with_other_thresholds(run_folder, tmp_path, capsys):
    out = tmp_path / "again"
    args = ["compress", str(run_folder / "checkpoint.pt"), "--thresholds", "fc1=-8,fc2=auto"]
    assert main([*args, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    fc1 = report["layers"][0]
    assert fc1["threshold"] == -8
    assert (out / "pruning-histograms.png").is_file() and not (out / "training.png").exists()
    # a low threshold prunes at least as much as the histogram's valley or -3
    auto = tmp_path / "auto"
    assert (
        main(
            [
                "compress",
                str(run_folder / "checkpoint.pt"),
                "--thresholds",
                "auto",
                "--no-figures",
                "--out",
                str(auto),
            ]
        )
        == 0
    )
    default = json.loads((auto / "report.json").read_text())["layers"][0]
    assert default["threshold"] > -8
    assert fc1["groups_kept"] <= default["groups_kept"]
    # the checkpoint's data by default: the same test images, so the same dense error
    first = json.loads((run_folder / "summary.json").read_text())
    assert report["test_examples"] == 2000
    assert report["dense_test_error"] == first["test_error_posterior_mean"]


def test_compress_within_an_error_budget_on_validation_images(run_folder, tmp_path):
    out = tmp_path / "budget"
    argv = ["compress", str(run_folder / "checkpoint.pt"), "--max-error-increase", "0.01"]
    argv += ["--no-figures"]
    assert main([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["validation_examples"] == 2000  # the images run held out
    assert report["max_error_increase"] == 0.01
    assert report["validation_error"] <= report["dense_validation_error"] + 0.01 + 1e-12


def test_compress_with_retraining_keeps_the_smaller_network_within_the_budget(
    run_folder, tmp_path, capsys
):
    out = tmp_path / "retrained"
    argv = ["compress", str(run_folder / "checkpoint.pt"), "--max-error-increase", "0.01"]
    argv += ["--retrain-epochs", "1", "--prune-error-increase", "0.05", "--no-figures"]
    assert main([*argv, "--out", str(out)]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("retraining after")]
    report = json.loads((out / "report.json").read_text())
    used = report["retraining"] is not None
    assert line.endswith("kept" if used else "not used")
    # either way the file's network keeps the budget over the original dense network
    dense = report["reference_validation_error"] if used else report["dense_validation_error"]
    assert report["validation_error"] <= dense + 0.01 + 1e-12
    assert report["weights"] == 784 * 300 + 300 * 100 + 100 * 10


def test_compress_tries_every_looser_budget_given(run_folder, tmp_path, monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs["prune_error_increase"])
        return compress_retrained(*args, **kwargs)

    monkeypatch.setattr(cli.commands, "compress_retrained", spy)
    out = tmp_path / "retrained"
    argv = ["compress", str(run_folder / "checkpoint.pt"), "--max-error-increase", "0.01"]
    argv += ["--retrain-epochs", "1", "--prune-error-increase", "0.005", "0.05", "--no-figures"]
    assert main([*argv, "--out", str(out)]) == 0
    assert calls == [[0.01, 0.05]]  # a looser budget is at least the budget


def test_compress_refits_the_chosen_network_on_every_training_image(run_folder, tmp_path, capsys):
    out = tmp_path / "refit"
    argv = ["compress", str(run_folder / "checkpoint.pt"), "--max-error-increase", "0.01"]
    argv += ["--refit-epochs", "1", "--no-figures", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("refit on all")]
    assert line.endswith(f"{report['test_error']:.2%} refit")
    assert report["refit"]["examples"] == 10_000  # the 8,000 trained on and the 2,000 held out
    assert report["refit"]["epochs"] == 1
    assert report["validation_error"] is None
    assert report["refit"]["chosen_validation_error"] <= (
        report["refit"]["chosen_dense_validation_error"] + 0.01 + 1e-12
    )
    chosen = tmp_path / "chosen"
    assert main([*argv[:4], "--no-figures", "--out", str(chosen)]) == 0
    without = json.loads((chosen / "report.json").read_text())
    assert report["architecture"] == without["architecture"]
    assert [layer["frac_bits"] for layer in report["layers"]] == [
        layer["frac_bits"] for layer in without["layers"]
    ]
    saved = pyro_bc.CompressedNetwork.load(out / "model.bc")
    weights = [m.weight for m in saved.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(w.numel() for w in weights) == report["weights_kept"]


def test_refitting_needs_held_out_images(run_folder, capsys):
    argv = ["compress", str(run_folder / "checkpoint.pt"), "--validation", "0"]
    assert main([*argv, "--refit-epochs", "1"]) == 2
    assert "--validation N > 0" in capsys.readouterr().err


def test_retraining_needs_a_budget(run_folder, capsys):
    argv = ["compress", str(run_folder / "checkpoint.pt"), "--retrain-epochs", "2"]
    assert main(argv) == 2
    assert "--max-error-increase" in capsys.readouterr().err


def test_retraining_rounds_need_retraining(run_folder, capsys):
    argv = ["compress", str(run_folder / "checkpoint.pt"), "--max-error-increase", "0.01"]
    assert main([*argv, "--retrain-rounds", "2"]) == 2
    assert "--retrain-rounds needs --retrain-epochs" in capsys.readouterr().err


def test_run_takes_the_recipe_where_options_are_not_given(tmp_path, monkeypatch):
    quick = Recipe(
        clip_var={"fc1": 0.04},
        epochs=2,
        decay_epochs=2,
        pretrain_epochs=0,
        lr=2e-3,
        batch_size=500,
        thresholds=-2.5,
    )
    monkeypatch.setitem(recipes.SUBSET_RECIPES, ("lenet300", "gnj"), quick)
    assert main(["run", "--mc-samples", "0", "--no-figures", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["epochs"], summary["pretrain_epochs"]) == (2, 0)
    assert (summary["lr"], summary["batch_size"], summary["decay_epochs"]) == (2e-3, 500, 2)
    report = json.loads((tmp_path / "report.json").read_text())
    assert {layer["threshold"] for layer in report["layers"]} == {-2.5}
    state = pyro_bc.load_checkpoint(tmp_path / "checkpoint.pt")
    assert [g["initial_lr"] for g in state["optimizer"]["param_groups"]] == [2e-3]
    # linear decay to 0 at the end of epoch 2 over 2 epochs: the second runs at half the rate
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [1e-3]
    assert len(state["history"]) == 2


def test_an_option_wins_over_the_recipe(tmp_path):
    argv = ["run", "--epochs", "1", "--pretrain-epochs", "0", "--lr", "5e-4", "--batch-size"]
    argv += ["1000", "--decay-epochs", "0", "--thresholds", "-4", "--mc-samples", "0"]
    argv += ["--no-figures", "--quiet"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["lr"], summary["batch_size"], summary["decay_epochs"]) == (5e-4, 1000, 0)
    state = pyro_bc.load_checkpoint(tmp_path / "checkpoint.pt")
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [5e-4]  # no decay
    report = json.loads((tmp_path / "report.json").read_text())
    assert {layer["threshold"] for layer in report["layers"]} == {-4}


def test_vgg16_on_synthetic_cifar10_trains_compresses_saves_loads_and_evaluates(vgg_folder, capsys):
    summary = json.loads((vgg_folder / "summary.json").read_text())
    report = json.loads((vgg_folder / "report.json").read_text())
    assert summary["model"] == "vgg16" and summary["width"] == 4
    # 1,024 synthetic training images, a fifth held out
    assert summary["validation"] == 204 and summary["dataset_size"] == 820
    assert len(report["layers"]) == 15  # 13 convolutions, 2 dense layers
    network = pyro_bc.load(vgg_folder / "model.bc")
    assert network.input_shape == (3, 32, 32)
    capsys.readouterr()
    argv = ["evaluate", str(vgg_folder / "model.bc"), "--data", "synthetic-cifar10"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 256
    assert result["error"] == pytest.approx(report["test_error"], abs=1e-9)
    assert main(["info", str(vgg_folder / "model.bc")]) == 0
    assert "Conv2d" in capsys.readouterr().out


def test_compress_rebuilds_the_vgg_width_from_the_checkpoint(vgg_folder, tmp_path):
    out = tmp_path / "again"
    argv = ["compress", str(vgg_folder / "checkpoint.pt"), "--no-figures", "--out", str(out)]
    assert main(argv) == 0
    again = json.loads((out / "report.json").read_text())
    first = json.loads((vgg_folder / "report.json").read_text())
    # same posterior, same thresholds, same (unaugmented) calibration images: same network
    assert again["architecture"] == first["architecture"]
    assert again["test_error"] == first["test_error"]


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_vgg16_trains_on_cuda(tmp_path):
    argv = ["run", "--model", "vgg16", "--data", "synthetic-cifar10", "--width", "4"]
    argv += ["--epochs", "1", "--pretrain-epochs", "1", "--device", "cuda", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert pyro_bc.load(tmp_path / "model.bc").input_shape == (3, 32, 32)


def test_export_writes_onnx_and_torchscript(run_folder, tmp_path, capsys):
    onnx, script = tmp_path / "out" / "m.onnx", tmp_path / "m.pt"
    argv = ["export", str(run_folder / "model.bc"), "--onnx", str(onnx)]
    assert main([*argv, "--torchscript", str(script)]) == 0
    assert onnx.stat().st_size > 0
    network = pyro_bc.load(run_folder / "model.bc")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(script)(x), network(x))


def test_info_describes_the_file(run_folder, capsys):
    capsys.readouterr()
    assert main(["info", str(run_folder / "model.bc")]) == 0
    out = capsys.readouterr().out
    assert "bytes" in out and "Linear" in out


# ---------------------------------------------------------------------------------------------
# every failure a user can cause: one line, exit status 2, no traceback


def _mnist_dir(path, labels_max=9):
    path.mkdir()
    write_idx(path / "train-images-idx3-ubyte.gz", torch.zeros(12, 28, 28, dtype=torch.uint8))
    write_idx(path / "train-labels-idx1-ubyte.gz", torch.full((12,), labels_max, dtype=torch.uint8))
    write_idx(path / "t10k-images-idx3-ubyte.gz", torch.zeros(2, 28, 28, dtype=torch.uint8))
    write_idx(path / "t10k-labels-idx1-ubyte.gz", torch.zeros(2, dtype=torch.uint8))
    return path


def _cifar_dir(path, bad_label=None):
    folder = path / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name in names:
        records = torch.zeros(4, 1 + 3 * 32 * 32, dtype=torch.uint8)
        if bad_label is not None and name == "data_batch_3.bin":
            records[2, 0] = bad_label
        (folder / name).write_bytes(records.numpy().tobytes())
    return path


def _legacy_checkpoint(source, path, change):
    """``source``'s state as a schema-0 file (no digest), after ``change(state)``."""
    state = torch.load(source, weights_only=True)
    for key in ("format", "version", "sha256"):
        state.pop(key)
    change(state)
    torch.save(state, path)
    return path


def _nan_guide(state):
    name = next(iter(state["guide"]))
    state["guide"][name] = torch.full_like(state["guide"][name], float("nan"))


def _tampered(source, path):
    state = torch.load(source, weights_only=True)
    name = next(iter(state["guide"]))
    state["guide"][name] = state["guide"][name] + 1
    torch.save(state, path)
    return path


def _denied(path):
    raise PermissionError(13, "Permission denied", str(path))


def error_cases(run_folder, tmp):
    """(argv, a fragment of the message) for every error path; files made in ``tmp``."""
    ckpt, bc = run_folder / "checkpoint.pt", run_folder / "model.bc"
    corrupt = tmp / "corrupt.bc"
    corrupt.write_bytes(b"\x00" * 40)
    garbage = tmp / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint" * 10)
    a_file = tmp / "a-file"
    a_file.write_text("x")
    resumed = tmp / "resumed"
    resumed.mkdir()
    shutil.copy(ckpt, resumed / "checkpoint.pt")
    broken_resume = tmp / "broken-resume"
    broken_resume.mkdir()
    shutil.copy(garbage, broken_resume / "checkpoint.pt")
    anonymous = tmp / "anonymous"  # a checkpoint of lenet300 that does not say so
    anonymous.mkdir()
    _legacy_checkpoint(ckpt, anonymous / "checkpoint.pt", lambda s: s.update(metadata={}))
    nan = _legacy_checkpoint(ckpt, tmp / "nan.pt", _nan_guide)
    tampered = _tampered(ckpt, tmp / "tampered.pt")
    quick = ["--epochs", "1", "--pretrain-epochs", "0", "--mc-samples", "0", "--quiet"]
    out = ["--out", str(tmp / "out")]
    return [
        # options, checked before any work
        (["run", "--epochs", "0"], "--epochs"),
        (["run", "--epochs", "two"], "--epochs"),
        (["run", "--batch-size", "-1"], "--batch-size"),
        (["run", "--lr", "0"], "--lr"),
        (["run", "--lr", "nan"], "--lr"),
        (["run", "--lr", "inf"], "--lr"),
        (["run", "--mc-samples", "-1"], "--mc-samples"),
        (["run", "--validation", "-5"], "--validation"),
        (["run", "--pretrain-epochs", "-1"], "--pretrain-epochs"),
        (["run", "--retrain-rounds", "0"], "--retrain-rounds"),
        (["run", "--retrain-epochs", "0", "--retrain-rounds", "2"], "--retrain-epochs"),
        (["run", "--max-error-increase", "1"], "--max-error-increase"),
        (["run", "--max-error-increase", "-0.1"], "--max-error-increase"),
        (["run", "--thresholds", "=3"], "LAYER=VALUE"),
        (["run", "--thresholds", "fc1=abc"], "'abc'"),
        (["run", "--thresholds", "-3", "--max-error-increase", "0.01"], "not allowed"),
        (["run", "--model", "resnet"], "--model"),
        (["run", "--out", str(a_file)], "--out"),
        (["run", "--out", str(a_file / "below")], "--out"),
        (["run", "--device", "tpu"], "--device"),
        *([] if CUDA else [(["run", "--device", "cuda"], "CUDA is not available")]),
        (["run", "--width", "4"], "--width"),
        (["run", "--seed", "x"], "--seed"),
        (["run", "--seed", "-1"], "--seed"),
        (["run", "--seed", str(2**32)], "--seed"),
        (["run", "--thresholds", "fc1=-3,fc9=-3", *out], "fc9"),
        (["compress", str(ckpt), "--thresholds", "conv1=-3"], "conv1"),
        (["run", "--validation", "0", "--max-error-increase", "0.01"], "--validation"),
        (["run", "--validation", "20000", *out], "only 10000 training images"),
        (["compress", str(tmp / "missing.pt")], "missing.pt does not exist"),
        (["compress", str(tmp)], "is a directory"),
        (["info", str(tmp / "missing.bc")], "missing.bc"),
        (["evaluate", str(tmp / "missing.bc")], "missing.bc"),
        (["export", str(bc)], "--onnx PATH"),
        (["export", str(bc), "--onnx", str(tmp)], "--onnx"),
        # data
        (["run", "--data", "/nonexistent/mnist", *out], "/nonexistent/mnist"),
        (["run", "--data", "synthetic-cifar10", *out], "takes mnist images"),
        (["run", "--model", "vgg16", "--data", "subset", *out], "takes cifar10 images"),
        (["run", "--data", str(_mnist_dir(tmp / "not-mnist")), *out], "not-mnist"),
        (["run", "--model", "vgg16", "--data", str(_cifar_dir(tmp / "c", 12)), *out], "label 12"),
        (["evaluate", str(bc), "--data", "synthetic-cifar10"], "takes mnist images"),
        # training
        (["run", *quick, "--lr", "1e6", *out], "training diverged"),
        # checkpoints
        (["run", "--model", "lenet5", "--resume", "--out", str(resumed)], "--model lenet300"),
        (["run", "--resume", *quick, "--out", str(broken_resume)], "cannot be read"),
        (["run", "--model", "lenet5", "--resume", *quick, "--out", str(anonymous)], "not of"),
        (["compress", str(garbage)], "cannot be read"),
        (["compress", str(ckpt), "--model", "lenet5"], "is not of this model"),
        (["compress", str(nan)], "non-finite"),
        (["compress", str(tampered)], "SHA-256"),
        # compressed files
        (["info", str(corrupt)], "corrupt.bc"),
        (["evaluate", str(corrupt)], "corrupt.bc"),
        (["export", str(corrupt), "--onnx", str(tmp / "x.onnx")], "corrupt.bc"),
    ]


def test_every_user_error_is_one_line_with_exit_status_2(run_folder, tmp_path, capsys):
    capsys.readouterr()
    for argv, fragment in error_cases(run_folder, tmp_path):
        status = main(argv)
        err = capsys.readouterr().err
        assert status == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, (argv, err)
        assert lines[0].startswith("pyro-bc: error:"), (argv, err)
        assert fragment in lines[0], (argv, fragment, err)
        assert "Traceback" not in err


@pytest.mark.parametrize("command", ["info", "evaluate"])
def test_unreadable_file_is_one_line(run_folder, command, capsys, monkeypatch):
    monkeypatch.setattr(Path, "read_bytes", _denied)  # root reads any file: deny it this way
    assert main([command, str(run_folder / "model.bc")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyro-bc: error:") and "Permission denied" in err
    assert len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.bc"
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(pyro_bc.codec.CompressedFileError):
        main(["--debug", "info", str(bad)])
    with pytest.raises(pyro_bc.codec.CompressedFileError):
        main(["info", str(bad), "--debug"])


# ---------------------------------------------------------------------------------------------
# help


def _subparsers():
    parser = cli.parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    return parser, commands.choices


def test_every_option_has_help_and_its_default_shown():
    parser, commands = _subparsers()
    for name, sub in [("pyro-bc", parser), *commands.items()]:
        text = sub.format_help()
        for action in sub._actions:
            if action.dest in ("help", "command"):
                continue
            assert action.help, (name, action.option_strings or action.dest)
            default = action.default
            if default is None or isinstance(default, bool) or default == "==SUPPRESS==":
                continue
            # argparse converts string defaults with the option's type when parsing
            assert f"(default: {default})" in " ".join(text.split()), (name, action.dest)
        assert "``" not in text and ":class:" not in text
    assert "examples:" in parser.format_help()
    assert "recipes" in commands["run"].format_help()


def test_options_without_a_fixed_default_say_where_it_comes_from():
    _, commands = _subparsers()
    for action in [a for sub in commands.values() for a in sub._actions]:
        if action.default is None and action.option_strings:
            assert "default: " in action.help, action.dest


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"pyro-bc {pyro_bc.__version__}"


def test_help_exits_0(capsys):
    assert main(["run", "--help"]) == 0
    assert "--max-error-increase" in capsys.readouterr().out


def test_parse_thresholds():
    assert parse_thresholds("auto") == "auto"
    assert parse_thresholds("-3") == -3.0
    assert parse_thresholds("fc1=-2.8,fc2=auto") == {"fc1": -2.8, "fc2": "auto"}
    with pytest.raises(Exception, match="LAYER=VALUE"):
        parse_thresholds("=3")
    with pytest.raises(Exception, match="neither a number"):
        parse_thresholds("nan")


def test_validation_default_is_a_fifth_of_small_data_sets():
    data = pyro_bc.datasets.synthetic_image_data((1, 4, 4), train=100, test=10)
    assert cli.split_validation(data, None)[1] == 20
    assert cli.split_validation(data, 0) == (data, 0)
    big = data._replace(train_y=torch.zeros(60_000, dtype=torch.long))
    assert cli.split_validation(big._replace(train_x=torch.zeros(60_000, 1)), None)[1] == 10_000


def test_synthetic_images_show_their_class_in_their_mean():
    data = pyro_bc.datasets.synthetic_image_data((3, 8, 8), train=2000, test=10, signal=1.0)
    # the per-class mean image recovers the class pattern: classes are told apart by it
    means = torch.stack([data.train_x[data.train_y == c].mean(0) for c in range(10)])
    nearest = ((data.train_x[:, None] - means[None]) ** 2).flatten(2).sum(-1).argmin(1)
    assert (nearest == data.train_y).float().mean() > 0.99
    again = pyro_bc.datasets.synthetic_image_data((3, 8, 8), train=2000, test=10, signal=1.0)
    assert torch.equal(again.train_x, data.train_x)
