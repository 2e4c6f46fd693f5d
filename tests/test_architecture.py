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


def imports(package: Path = PACKAGE) -> dict[str, dict[str, list[str]]]:
    """Per subpackage: the other subpackages it imports, with where."""
    found: dict[str, dict[str, list[str]]] = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).parts
        if len(parts) == 1:
            continue  # the package root: __init__ (AmygdalaError) and __main__ (the cli)
        pkg = parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                bits = name.split(".")
                if bits[0] == "amygdala" and len(bits) > 1 and bits[1] != pkg:
                    target = bits[1]
                    if (package / target).is_dir():
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
