"""Shared fixtures: tiny models saved once per session, synthetic corpora per test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny.make_model("llama", path)
    return path


@pytest.fixture()
def synthetic_corpus(tmp_path) -> Path:
    return tiny.write_corpus(tmp_path / "corpus")


@pytest.fixture()
def planted(tmp_path):
    """A tiny Llama whose embeddings of alpha's words carry a known direction, and a corpus.

    Returns (model folder, corpus folder, the planted unit direction).
    """
    model, tok = tiny.make_model("llama", hidden=64, layers=4)
    d = tiny.random_unit(64, 7)
    tiny.plant(model, tok, tiny.CONCEPT_WORDS["alpha"], d, scale=1.0)
    path = tmp_path / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, tiny.write_corpus(tmp_path / "corpus"), d


@pytest.fixture()
def one_thread():
    """Tiny matrices: one thread is faster, and immune to a busy machine's thread contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The transformers side of every vLLM parity check. A module that starts a server defines
# `files` as (folder, model folder, readout folder, ...), the layout helpers.serve.make_files
# writes; these two read it once per module. A module whose `files` differs defines its own.
@pytest.fixture(scope="module")
def hf(files):
    """The served model folder as transformers loads it, in float32 (the parity tolerances assume it)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(files[1], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def readout(files):
    """The readout the module's server serves."""
    from amygdala.readout import Readout

    return Readout.load(files[2])


#: Fixtures that bring in something the fast tier (./dev test --fast) leaves out, and the marker
#: a test that uses one gets, so that a new browser or llama.cpp test is in the right tier without
#: anyone remembering to mark it.
NEEDS = {"browser": "browser", "llama_setup": "llamacpp"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, marker in NEEDS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)
