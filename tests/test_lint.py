"""The linter's rules ([tool.ruff.lint] in pyproject.toml) hold on the source, the tests and the benches."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    """The ruff of this environment (the test extra pins it), else one on PATH."""
    beside = Path(sys.executable).with_name("ruff")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed: pip install -e '.[test]' (pyproject.toml pins it)")
    return [found]


def test_ruff_finds_nothing():
    run = subprocess.run([*_ruff(), "check", "--no-cache", "amygdala", "tests", "bench"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, f"ruff check found problems (fix them or, deliberately, the rules):\n{run.stdout}{run.stderr}"


def test_ruff_fails_on_a_planted_finding(tmp_path):
    """The check is live: an unused import in a file under the same rules is a finding."""
    (tmp_path / "planted.py").write_text("import os\n")
    run = subprocess.run([*_ruff(), "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), str(tmp_path / "planted.py")],
                         capture_output=True, text=True)
    assert run.returncode == 1 and "F401" in run.stdout
