import json

import pytest

from pyro_bc.cli import main, parse_thresholds


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    status = main(
        ["run", "--epochs", "1", "--pretrain-epochs", "1", "--mc-samples", "0", "--out", str(out)]
    )
    assert status == 0
    return out


def test_run_writes_checkpoint_compressed_file_and_report(run_folder, capsys):
    summary = json.loads((run_folder / "summary.json").read_text())
    report = json.loads((run_folder / "report.json").read_text())
    assert (run_folder / "checkpoint.pt").is_file()
    assert (run_folder / "model.bc").stat().st_size == report["file_bytes"]
    assert summary["architecture"] == report["architecture"]
    assert 0 <= summary["test_error_compressed"] < 0.5


def test_evaluate_reads_back_the_stated_error(run_folder, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(run_folder / "model.bc")]) == 0
    result = json.loads(capsys.readouterr().out)
    report = json.loads((run_folder / "report.json").read_text())
    assert result["error"] == pytest.approx(report["test_error"], abs=1e-3)


def test_compress_a_checkpoint_with_other_thresholds(run_folder, tmp_path, capsys):
    out = tmp_path / "again"
    args = ["compress", str(run_folder / "checkpoint.pt"), "--thresholds", "fc1=-8,fc2=auto"]
    assert main([*args, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    fc1 = report["layers"][0]
    # a low threshold prunes at least as much as the default one
    default = json.loads((run_folder / "report.json").read_text())["layers"][0]
    assert fc1["groups_kept"] <= default["groups_kept"]


def test_info_describes_the_file(run_folder, capsys):
    capsys.readouterr()
    assert main(["info", str(run_folder / "model.bc")]) == 0
    out = capsys.readouterr().out
    assert "bytes" in out and "Linear" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "missing.bc"], "missing.bc"),
        (["evaluate", "missing.bc"], "missing.bc"),
        (["compress", "missing.pt"], "missing.pt"),
        (["run", "--data", "/nonexistent/mnist", "--epochs", "1"], "/nonexistent/mnist"),
    ],
)
def test_user_errors_are_one_line(argv, message, capsys, tmp_path):
    assert main([*argv, *(["--out", str(tmp_path)] if argv[0] == "run" else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyro-bc: error:") and message in err
    assert len(err.strip().splitlines()) == 1


def test_corrupt_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.bc"
    bad.write_bytes(b"\x00" * 40)
    assert main(["info", str(bad)]) == 2
    assert "bad.bc" in capsys.readouterr().err


def test_parse_thresholds():
    assert parse_thresholds("auto") == "auto"
    assert parse_thresholds("-3") == -3.0
    assert parse_thresholds("fc1=-2.8,fc2=auto") == {"fc1": -2.8, "fc2": "auto"}
    with pytest.raises(Exception, match="LAYER=VALUE"):
        parse_thresholds("=3")
