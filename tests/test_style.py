"""The tree is lint-clean and formatted (ruff, configured in pyproject.toml)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]])
def test_ruff(command):
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    result = subprocess.run([ruff, *command], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_tables_are_not_split_by_blank_lines():
    # A blank line between two table rows ends the table: the rest renders as raw `|` text.
    lines = (ROOT / "README.md").read_text().splitlines()
    split = [
        i + 1
        for i in range(1, len(lines) - 1)
        if not lines[i].strip() and lines[i - 1].startswith("|") and lines[i + 1].startswith("|")
    ]
    assert not split, f"README.md: blank line inside a table at line(s) {split}"


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text().splitlines()
    command = next(line for line in readme if "pytest" in line).split("#")[0].strip()
    assert command in (ROOT / ".ci" / "run").read_text()
