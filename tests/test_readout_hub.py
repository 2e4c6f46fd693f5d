"""Readout.load by Hugging Face repo id from a local cache written by hand; never a download."""

from __future__ import annotations

import pytest
import torch
from helpers.hub import write_cached_repo

from amygdala.cli.main import main
from amygdala.readout import Readout, ReadoutError


def _readout() -> Readout:
    v = torch.nn.functional.normalize(torch.randn(2, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    return Readout(concepts=["a", "b"], layers=[1], vectors={1: v})


def test_load_by_repo_id_from_the_local_cache(tmp_path, monkeypatch):
    folder = _readout().save(tmp_path / "readout")
    write_cached_repo(tmp_path / "cache", "someone/feelings", folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # "someone/feelings" is no folder here
    got = Readout.load("someone/feelings")
    assert got.concepts == ["a", "b"] and torch.equal(got.vectors[1], Readout.load(folder).vectors[1])


def test_unknown_repo_id_names_the_cache_and_how_to_fill_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ReadoutError, match=r"not in the local Hugging Face cache .*cache.*huggingface-cli download no/such"):
        Readout.load("no/such")
    assert main(["export", "--readout", "no/such", "--concept", "a", "--format", "gguf", "--out", "x.gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "huggingface-cli download no/such" in err
    assert main(["export", "--readout", str(tmp_path / "missing"), "--concept", "a", "--format", "gguf", "--out", "x.gguf"]) == 2
    assert "missing" in capsys.readouterr().err
