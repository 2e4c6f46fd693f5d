"""The import rules of docs/architecture.md hold in the source."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "amygdala"


def rules() -> dict[str, set[str]]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"```rules\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md lost its ```rules block"
    out = {}
    for line in block.group(1).strip().splitlines():
        name, _, allowed = line.partition(":")
        out[name.strip()] = set(allowed.split())
    return out


def imported_modules(node: ast.AST, parts: tuple[str, ...]) -> list[str]:
    """The absolute module names an import statement in ``amygdala/<parts>`` reaches.

    ``from amygdala import checkpoint`` reaches ``amygdala.checkpoint`` (each imported name may be
    a subpackage), and a relative import is resolved against the file's own package, so neither
    form slips past the rules.
    """
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level == 0:
        base = node.module or ""
    else:
        package = ["amygdala", *parts[:-1]]  # the file's package (for __init__.py: its own folder)
        up = node.level - 1
        if up >= len(package):
            return []  # beyond the top: Python refuses it anyway
        base = ".".join(package[: len(package) - up] + ([node.module] if node.module else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def imports(package: Path = PACKAGE) -> dict[str, dict[str, list[str]]]:
    """Per subpackage: the other subpackages it imports, with where."""
    found: dict[str, dict[str, list[str]]] = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).parts
        if len(parts) == 1:
            continue  # the package root: __init__ (AmygdalaError) and __main__ (the cli)
        pkg = parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names = imported_modules(node, parts)
            targets = set()
            for name in names:
                bits = name.split(".")
                if bits[0] == "amygdala" and len(bits) > 1 and bits[1] != pkg and (package / bits[1]).is_dir():
                    targets.add(bits[1])
            for target in sorted(targets):
                found.setdefault(pkg, {}).setdefault(target, []).append(f"{path.relative_to(package)}:{node.lineno}")
    return found


def test_every_subpackage_has_rules():
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert subpackages == set(rules()), "docs/architecture.md's rules must list every subpackage"


def violations(package: Path = PACKAGE) -> list[str]:
    allowed = rules()
    return [
        f"{where}: {pkg} imports {target}"
        for pkg, targets in imports(package).items()
        for target, wheres in targets.items()
        if target not in allowed.get(pkg, set())
        for where in wheres
    ]


def test_imports_follow_the_rules():
    broken = violations()
    assert not broken, "imports against docs/architecture.md:\n" + "\n".join(broken)


def test_the_checker_finds_a_forbidden_import(tmp_path):
    """The checker is not vacuous: a pipeline module importing quality is reported, lazily or not."""
    for name in ("pipeline", "quality", "corpus"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "x.py").write_text("def f():\n    from amygdala.quality.report import compute\n")
    (tmp_path / "corpus" / "y.py").write_text("import amygdala.pipeline.build\n")
    assert sorted(violations(tmp_path)) == ["corpus/y.py:1: corpus imports pipeline", "pipeline/x.py:2: pipeline imports quality"]


def test_the_checker_sees_from_amygdala_import_and_relative_imports(tmp_path):
    """``from amygdala import quality`` and ``from ..quality import x`` are imports of quality too."""
    for name in ("pipeline", "quality", "corpus", "methods"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "a.py").write_text("from amygdala import quality\n")
    (tmp_path / "corpus" / "b.py").write_text("from ..pipeline import build\n")
    (tmp_path / "corpus" / "c.py").write_text("from . import loader\nfrom .. import methods\n")
    assert sorted(violations(tmp_path)) == [
        "corpus/b.py:1: corpus imports pipeline",
        "corpus/c.py:2: corpus imports methods",
        "pipeline/a.py:1: pipeline imports quality",
    ]


def test_a_planted_relative_import_fails_the_rules_on_the_real_tree(tmp_path):
    """A copy of the real package with one relative import added breaks the rules test."""
    import shutil

    copy = tmp_path / "amygdala"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "bundled"))
    assert violations(copy) == []
    with open(copy / "corpus" / "__init__.py", "a") as f:
        f.write("\nfrom ..readout import Readout  # planted\n")
    planted = violations(copy)
    assert len(planted) == 1 and planted[0].startswith("corpus/__init__.py:") and planted[0].endswith("corpus imports readout")


def test_importing_the_corpus_loads_no_torch():
    """A corpus must be checkable without torch (docs/architecture.md): importing it loads none."""
    import subprocess
    import sys

    code = "import sys, amygdala.corpus; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", f"importing amygdala.corpus loaded {run.stdout.strip()}"


def diagram(allowed: dict[str, set[str]]) -> str:
    """The drawing in docs/architecture.md, made from the rules: one row per subpackage, the rows
    grouped by level (a subpackage sits one level above the highest it imports; level 0 imports
    none of ours), each row naming what it imports, so the drawing cannot disagree with the rules."""
    level: dict[str, int] = {}

    def depth(name: str) -> int:
        if name not in level:
            level[name] = 1 + max((depth(d) for d in allowed[name]), default=-1)
        return level[name]

    for name in allowed:
        depth(name)
    width = max(map(len, allowed))
    rows = []
    for lv in range(max(level.values()), -1, -1):
        rows.append(f"level {lv}")
        for name in sorted(n for n in allowed if level[n] == lv):
            deps = " ".join(sorted(allowed[name], key=lambda d: (-level[d], d)))
            rows.append((f"  {name:<{width}}" + (f"  ──► {deps}" if deps else "")).rstrip())
    return "\n".join(rows)


def test_the_diagram_is_drawn_from_the_rules():
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"```diagram\n(.*?)\n```", text, re.S)
    assert block, "docs/architecture.md lost its ```diagram block"
    expected = diagram(rules())
    assert block.group(1) == expected, f"redraw docs/architecture.md's diagram from the rules:\n{expected}"
