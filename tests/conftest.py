"""Shared fixtures: tiny models saved once per session, synthetic corpora per test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny.make_model("llama", path)
    return path


@pytest.fixture()
def synthetic_corpus(tmp_path) -> Path:
    return tiny.write_corpus(tmp_path / "corpus")
