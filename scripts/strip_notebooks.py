"""Strips outputs and execution counts from notebooks, so that git holds only their sources.

Run it before committing a notebook you executed (``--check`` only reports, exit status 1 if any
notebook needs stripping)::

    python scripts/strip_notebooks.py                 # every notebook in tutorials/
    python scripts/strip_notebooks.py --check
    python scripts/strip_notebooks.py path/to/notebook.ipynb
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
#: cell metadata written by Jupyter front ends while running, not part of the source
VOLATILE_CELL_METADATA = ("execution", "collapsed", "scrolled", "ExecuteTime")
#: notebook metadata worth keeping: which kernel runs it and its language
KEPT_NOTEBOOK_METADATA = ("kernelspec", "language_info")


def strip(nb) -> bool:
    """Strips ``nb`` in place; returns whether anything changed.

    Example::

        nb = nbformat.read("tutorials/01_quickstart.ipynb", as_version=4)
        if strip(nb):
            nbformat.write(nb, "tutorials/01_quickstart.ipynb")
    """
    changed = False
    for cell in nb.cells:
        for key in VOLATILE_CELL_METADATA:
            if key in cell.metadata:
                del cell.metadata[key]
                changed = True
        if cell.cell_type != "code":
            continue
        if cell.outputs or cell.execution_count is not None:
            cell.outputs, cell.execution_count = [], None
            changed = True
    for key in list(nb.metadata):
        if key not in KEPT_NOTEBOOK_METADATA:
            del nb.metadata[key]
            changed = True
    language = nb.metadata.get("language_info", {})
    for key in list(language):
        if key != "name":  # versions and mimetypes change with every kernel that runs it
            del language[key]
            changed = True
    return changed


def _write_atomically(nb, path: Path):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            nbformat.write(nb, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="default: tutorials/*.ipynb")
    parser.add_argument("--check", action="store_true", help="only report; exit 1 if unstripped")
    args = parser.parse_args(argv)
    paths = args.paths or sorted((ROOT / "tutorials").glob("*.ipynb"))
    dirty = []
    for path in paths:
        nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
        if strip(nb):
            dirty.append(path)
            if not args.check:
                _write_atomically(nb, path)
    verb = "need stripping" if args.check else "stripped"
    for path in dirty:
        print(f"{verb}: {path}")
    return 1 if args.check and dirty else 0


if __name__ == "__main__":
    sys.exit(main())
