"""The tutorials run top to bottom (in their CI mode) and are committed without outputs."""

import sys
import time
from pathlib import Path

import pytest

import pyro_bc

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
EXPECTED = [
    "01_quickstart.ipynb",
    "02_horseshoe_lenet5.ipynb",
    "03_custom_prior.ipynb",
    "04_bits_from_uncertainty.ipynb",
    "05_your_own_network.ipynb",
]
CELL_TIMEOUT_S = 300

# Run first in the kernel (not stored in the notebooks): the kernel must be this test's Python,
# so that it imports the pyro_bc under test rather than one from another environment.
PYRO_BC_FILE = str(Path(pyro_bc.__file__).resolve())
KERNEL_CHECK = f"""
import sys, pathlib
assert pathlib.Path(sys.prefix).resolve() == pathlib.Path({sys.prefix!r}).resolve(), sys.prefix
import pyro_bc
assert str(pathlib.Path(pyro_bc.__file__).resolve()) == {PYRO_BC_FILE!r}, pyro_bc.__file__
"""


def test_the_five_tutorials_are_there():
    assert [path.name for path in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_tutorial_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, (
        f"{path.name}: cells {dirty} hold outputs or execution counts; run "
        "python scripts/strip_notebooks.py"
    )


# 18-60 s each on a loaded 2-core machine (168 s for the five), more than the rest of the
# default suite together: run with -m slow, as CI does.
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_tutorial_runs_in_ci_mode(path, tmp_path, monkeypatch):
    # The kernel inherits this environment: CI selects the notebooks' smoke-test mode, and one
    # OpenMP thread keeps torch from oversubscribing a shared machine.
    monkeypatch.setenv("CI", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(KERNEL_CHECK))
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        # run in a scratch folder: nothing a notebook writes lands in tutorials/
        resources={"metadata": {"path": str(tmp_path)}},
    )
    started = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    seconds = time.perf_counter() - started
    print(f"{path.name}: {seconds:.1f} s")
    figures = sum(
        "image/png" in output.get("data", {})
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )
    assert figures > 0, f"{path.name} displayed no figure"
    # a warning in a tutorial is noise to its reader (e.g. tqdm's "IProgress not found")
    warnings = [
        (i, output.text)
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream" and output.name == "stderr" and "Warning" in output.text
    ]
    assert not warnings, f"{path.name}: cells print warnings: {warnings}"
