"""The README's commands exist and run, so a rename cannot leave the README behind.

Every `amygdala ...` shown in README.md and docs/*.md (shell blocks and inline code) is checked against the
CLI's own parser: each subcommand (`a|b` alternatives each) and each `--flag`. Every
`amygdala ...` in a shell block is also run, in-process, on a tiny model standing in for the
default one (the real one takes minutes). `./dev` commands are checked against the dev script's
own jobs, and the one that installs nothing (`./dev bench`, the list) is run. The README's
Python block's imports are executed.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from amygdala.cli.main import build_parser, main
from helpers import tiny

ROOT = Path(__file__).resolve().parent.parent
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell|console)\n(.*?)^```", re.S | re.M)
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`(amygdala [^`]+|\./dev [^`]+)`")


def shell_commands(text: str) -> list[str]:
    """Each command line of the shell blocks, comments dropped."""
    lines = []
    for block in SHELL_BLOCK.findall(text):
        for line in block.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                lines.append(line)
    return lines


def inline_commands(text: str) -> list[str]:
    return [m.replace("\\|", "|") for m in INLINE.findall(text)]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def problems(command: str, root: argparse.ArgumentParser) -> list[str]:
    """What of ``amygdala ...`` the parser does not know: subcommands, then flags (up to ``--``)."""
    words = [w.strip("[]") for w in command.split()[1:]]
    found, out = [root], []
    while words and _subparsers(found[0]) and not words[0].startswith(("-", "<")):  # <job>: a placeholder
        names = words.pop(0).split("|")
        nxt = []
        for p in found:
            for name in names:
                if name in _subparsers(p):
                    nxt.append(_subparsers(p)[name])
                else:
                    out.append(f"`{command}`: no subcommand {name!r}")
        found = nxt
        if not found:
            return out
    for word in words:
        if word == "--":  # the rest goes to vLLM
            break
        if word.startswith("--") and len(word) > 2:
            flag = word.split("=")[0]
            out += [f"`{command}`: {p.prog} has no {flag}" for p in found if flag not in _flags(p)]
    return out


def dev_jobs() -> set[str]:
    """The jobs the dev script's case statement handles."""
    return set(re.findall(r"^  (\w+)\)$", (ROOT / "dev").read_text(), re.M))


README = (ROOT / "README.md").read_text()


def test_every_amygdala_command_in_the_readme_is_in_the_parser():
    commands = [c for c in shell_commands(README) + inline_commands(README) if c.startswith("amygdala ")]
    assert len(commands) > 15  # the table and the tour: the parsing found them
    root = build_parser()
    bad = [p for c in commands for p in problems(c, root)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("doc", sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_every_amygdala_command_in_the_docs_is_in_the_parser(doc):
    text = (ROOT / "docs" / doc).read_text()
    root = build_parser()
    bad = [p for c in shell_commands(text) + inline_commands(text) if c.startswith("amygdala ") for p in problems(c, root)]
    assert not bad, "\n".join(bad)


def test_the_check_catches_a_renamed_subcommand_and_flag():
    root = build_parser()
    assert problems("amygdala read --readout OUT", root) == []
    assert problems("amygdala reed --readout OUT", root) == ["`amygdala reed --readout OUT`: no subcommand 'reed'"]
    assert problems("amygdala checkpoint sync|diagnoze --model-dir D", root) == \
        ["`amygdala checkpoint sync|diagnoze --model-dir D`: no subcommand 'diagnoze'"]
    assert problems("amygdala build --corpus-dir D", root) == ["`amygdala build --corpus-dir D`: amygdala build has no --corpus-dir"]


def test_every_dev_command_in_the_readme_is_a_job_of_dev():
    commands = [c for c in shell_commands(README) + inline_commands(README) if c.startswith("./dev ")]
    jobs, benches = dev_jobs(), {p.stem for p in (ROOT / "bench").glob("*.py")}
    assert {"demo", "test", "bench"} <= jobs
    for c in commands:
        words = c.split()
        assert words[1] in jobs, f"`{c}`: ./dev has no job {words[1]!r} ({sorted(jobs)})"
        if words[1] == "bench" and len(words) > 2 and not words[2].startswith("-") and words[2] != "NAME":
            assert words[2] in benches, f"`{c}`: no bench/{words[2]}.py"
        if words[1] == "test" and "--fast" in words:
            assert "--fast" in (ROOT / "dev").read_text()


def test_dev_bench_lists_every_bench_without_installing():
    out = subprocess.run([str(ROOT / "dev"), "bench"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for p in (ROOT / "bench").glob("*.py"):
        assert re.search(rf"^  {p.stem} +\S", out.stdout, re.M), f"{p.stem} missing from ./dev bench:\n{out.stdout}"


def test_every_amygdala_command_in_the_readmes_shell_blocks_runs(tmp_path, monkeypatch, capsys):
    """In order (later commands read what earlier ones wrote), on a tiny model for `default`."""
    model = tmp_path / "tiny-model"
    tiny.make_model("llama", model)
    monkeypatch.chdir(tmp_path)
    commands = [c for c in shell_commands(README) if c.startswith("amygdala ")]
    assert commands, "the README shows no amygdala command in a shell block"
    for command in commands:
        argv = shlex.split(command)[1:]
        argv = [str(model) if a == "default" else a for a in argv]
        if argv[0] in {"build", "read", "generate"} and "--model" not in argv:
            argv[1:1] = ["--model", str(model)]
        if argv[0] == "generate" and "--max-new-tokens" not in argv:
            argv[1:1] = ["--max-new-tokens", "4"]  # a tiny model's greedy text is noise: keep it short
        rc = main(argv)
        assert rc == 0, f"`{command}` (run as amygdala {shlex.join(argv)}) exited {rc}: {capsys.readouterr().err}"


def test_the_readmes_python_block_imports():
    blocks = PYTHON_BLOCK.findall(README)
    assert blocks
    imports = "\n".join(line for b in blocks for line in b.splitlines() if re.match(r"(from \S+ )?import ", line))
    assert imports
    exec(compile(imports, "README.md", "exec"), {})


@pytest.mark.parametrize("text, expected", [
    ("```bash\n./dev demo   # a comment\n\n./dev test\n```\n", ["./dev demo", "./dev test"]),
    ("```python\nx = 1\n```\n", []),
])
def test_shell_blocks_are_parsed(text, expected):
    assert shell_commands(text) == expected
