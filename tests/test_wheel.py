"""A wheel built from the repository carries every runtime file, the bundled corpus included,
and works from a fresh virtual environment outside the checkout."""

import site
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT), "-w", str(out)],
                   check=True, capture_output=True, timeout=600)
    (found,) = out.glob("amygdala-*.whl")
    return found


def runtime_files() -> set[str]:
    """Every file of the package in the source tree that an installed amygdala reads."""
    files = set()
    for path in (ROOT / "amygdala").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            files.add(path.relative_to(ROOT).as_posix())
    return files


def test_the_wheel_has_every_runtime_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(runtime_files() - names)
    assert not missing, f"{len(missing)} runtime files not in the wheel, e.g. {missing[:5]}"
    assert "amygdala/corpus/bundled/manifest.toml" in names
    assert sum(n.startswith("amygdala/corpus/bundled/stories/") for n in names) >= 200


def test_the_installed_wheel_finds_its_corpus_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    # without the caller's PYTHONPATH, which could put a checkout ahead of the installed wheel
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=300, env=env)
    # The dependencies (torch, transformers...) come from this environment's site-packages, added
    # as a plain path: its .pth files (among them the editable install of this checkout) are not run.
    purelib = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                           text=True).strip())
    (purelib / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n" + "\n".join(site.getsitepackages()) + "\n")
    where = subprocess.run([str(python), "-c", "import amygdala.corpus as c; print(c.__file__); print(c.bundled_corpus())"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert where.returncode == 0, where.stderr
    module, corpus = where.stdout.split()
    assert module.startswith(str(venv)) and corpus.startswith(str(venv)), where.stdout
    check = subprocess.run([str(venv / "bin" / "amygdala"), "corpus", "check", "--quiet"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300, env=env)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
    assert check.stderr.strip().endswith("0 problem(s)")
