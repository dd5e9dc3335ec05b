"""The committed benchmark results hold together: each ``benchmarks/results/<run>.bc`` file,
evaluated on the MNIST test set with ``pyro-bc evaluate``, gives the error its JSON records, and
README's table is ``table.md``, the table built from those JSON files."""

import json
from pathlib import Path

import pytest

from pyro_bc.cli import main

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FULL_MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
RUNS = ["lenet300-gnj", "lenet300-ghs", "lenet5-gnj", "lenet5-ghs"]


@pytest.mark.parametrize("run", RUNS)
def test_committed_file_gives_the_recorded_test_error(run, capsys):
    if not FULL_MNIST_DIR.is_dir():
        pytest.skip(f"full MNIST not found at {FULL_MNIST_DIR}")
    report = json.loads((RESULTS / f"{run}.json").read_text())["report"]
    path = RESULTS / f"{run}.bc"
    assert path.stat().st_size == report["file_bytes"]

    assert main(["evaluate", str(path), "--data", str(FULL_MNIST_DIR)]) == 0
    evaluated = json.loads(capsys.readouterr().out)

    assert evaluated["n"] == report["test_examples"] == 10_000
    # counted in images, so that a float printed and read back cannot differ in its last digit
    assert round(evaluated["error"] * evaluated["n"]) == round(report["test_error"] * 10_000)


def test_readme_table_is_the_results_table():
    table = (RESULTS / "table.md").read_text().strip().splitlines()
    readme = (ROOT / "README.md").read_text().splitlines()
    start = readme.index(table[0])
    assert readme[start : start + len(table)] == table
