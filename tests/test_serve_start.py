"""The vLLM plugin refuses what cannot work before it serves: a readout of the wrong hidden size
stops the server at start, and ``amygdala serve`` checks the readout before starting vLLM.
Split from tests/test_serve.py: the first starts its own (failing) server, the second none."""

from __future__ import annotations

import pytest

from helpers import serve as sh

vllm = pytest.mark.vllm


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return sh.make_files(tmp_path_factory.mktemp("serve"))


@vllm
def test_hidden_size_mismatch_stops_the_server_at_start(files):
    pytest.importorskip("vllm")
    root, model, _, bad = files
    server = sh.start_server(model, root / "bad.log", readout=bad, wait=False)
    try:
        rc = server.proc.wait(180)
    finally:
        server.stop()
    log = (root / "bad.log").read_text()
    assert rc != 0
    assert "readout hidden size 64 does not fit" in log and "hidden size 128" in log, log[-3000:]


@vllm
def test_cli_checks_before_starting_vllm(files, tmp_path, capsys):
    import argparse

    pytest.importorskip("vllm")
    from amygdala import AmygdalaError
    from amygdala.cli import serve as cli

    root, model, readout, bad = files
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", str(model), "--readout", str(bad)])
    with pytest.raises(AmygdalaError, match="readout hidden size 64 does not fit"):
        args.func(args)
    args = parser.parse_args(["serve", "--model", str(model), "--readout", str(readout), "--dry-run", "--", "--max-num-seqs", "4"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "VLLM_PLUGINS=amygdala" in out and "--enforce-eager" in out and out.rstrip().endswith("--max-num-seqs 4")
    assert "--host 127.0.0.1" in out
