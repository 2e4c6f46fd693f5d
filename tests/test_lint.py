"""The linter's rules ([tool.ruff.lint] in pyproject.toml) hold on the source, the tests and the benches;
the type checker ([tool.mypy]) holds on the public API's modules."""

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


def test_mypy_finds_nothing_on_the_public_api():
    """build, BuildConfig, Readout, attach and Steering type-check under [tool.mypy]."""
    pytest.importorskip("mypy", reason="mypy is not installed: pip install -e '.[test]' (pyproject.toml pins it)")
    run = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, f"mypy found problems in the public API's modules:\n{run.stdout}{run.stderr}"


def test_mypy_fails_on_a_planted_finding(tmp_path):
    """The check is live: an untyped function and a wrong return type under the same settings."""
    pytest.importorskip("mypy", reason="mypy is not installed: pip install -e '.[test]' (pyproject.toml pins it)")
    planted = tmp_path / "planted.py"
    planted.write_text("def f(x):\n    return x\n\n\ndef g(x: int) -> str:\n    return x\n")
    run = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                          "--cache-dir", str(tmp_path / "cache"), str(planted)], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 1 and "no-untyped-def" in run.stdout and "return-value" in run.stdout, run.stdout
