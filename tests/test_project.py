"""The project's promises about itself: the README's commands are what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line for block in blocks for line in block.strip().splitlines()]


def test_readme_has_the_two_set_up_commands():
    commands = _readme_commands()
    assert any("pyro-bc run" in c and "pip install" in c for c in commands)
    assert any(c.rstrip().endswith("pytest") and "pip install" in c for c in commands)


def test_ci_runs_the_readme_test_command():
    (test_command,) = [c for c in _readme_commands() if c.rstrip().endswith("pytest")]
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci
