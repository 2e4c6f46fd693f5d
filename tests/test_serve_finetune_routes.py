"""The training routes and settings without vLLM: off without a key and needing it when set,
settings from the environment naming a bad variable, ``amygdala serve`` training without a
readout. Split from tests/test_serve_finetune.py (the vLLM half)."""

from __future__ import annotations

import pytest

from helpers import tiny
from helpers.training import request

KEY = "test-key-7"


def test_routes_are_off_without_a_key_and_need_it_when_set(monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from amygdala.serve import config, finetune_routes

    monkeypatch.delenv(config.API_KEY_ENV, raising=False)
    app = FastAPI()
    finetune_routes.TrainingRoutes().attach(app)
    client = TestClient(app)
    assert client.post("/train", json=request()).status_code == 404
    assert client.get("/train/status").status_code == 404
    assert client.post("/checkpoint").status_code == 404

    monkeypatch.setenv(config.API_KEY_ENV, KEY)
    app = FastAPI()
    finetune_routes.TrainingRoutes().attach(app)
    client = TestClient(app)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}, {"Authorization": KEY}):
        for method, path in (("post", "/train"), ("get", "/train/status"), ("post", "/checkpoint")):
            r = getattr(client, method)(path, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError", (headers, path)
            assert r.headers["www-authenticate"] == "Bearer"
    r = client.post("/train", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"


def test_settings_come_from_the_environment_and_bad_values_name_the_variable(monkeypatch):
    from amygdala.serve import config, finetune_engine

    for var in (config.OPTIMIZER_ENV, config.SYNC_DELAY_ENV, config.THREADS_ENV):
        monkeypatch.delenv(var, raising=False)
    assert finetune_engine.settings() == ("apollo-mini", 600.0, 0)
    monkeypatch.setenv(config.SYNC_DELAY_ENV, "30")
    monkeypatch.setenv(config.OPTIMIZER_ENV, "apollo")
    monkeypatch.setenv(config.THREADS_ENV, "2")
    assert finetune_engine.settings() == ("apollo", 30.0, 2)
    for var, value in ((config.SYNC_DELAY_ENV, "soon"), (config.SYNC_DELAY_ENV, "-1"), (config.OPTIMIZER_ENV, "sgd"),
                       (config.THREADS_ENV, "0")):
        monkeypatch.setenv(var, value)
        with pytest.raises(finetune_engine.TrainingSetupError, match=rf"^{var}={value!r}: "):
            finetune_engine.settings()
        monkeypatch.delenv(var)


@pytest.mark.vllm  # imports vLLM
def test_amygdala_serve_trains_without_a_readout_when_the_key_is_set(tmp_path, monkeypatch, capsys):
    import argparse

    pytest.importorskip("vllm")
    from amygdala import AmygdalaError
    from amygdala.cli import serve as cli
    from amygdala.serve import config

    folder = tmp_path / "model"
    tiny.make_model("llama", folder)
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    for var in (config.API_KEY_ENV, "AMYGDALA_READOUT", "VLLM_READOUT_VECTORS"):
        monkeypatch.delenv(var, raising=False)
    args = parser.parse_args(["serve", "--model", str(folder), "--dry-run"])
    with pytest.raises(AmygdalaError, match=f"nothing to serve: give --readout, or set {config.API_KEY_ENV}"):
        args.func(args)
    monkeypatch.setenv(config.API_KEY_ENV, KEY)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("VLLM_PLUGINS=amygdala ") and "--host 127.0.0.1" in out and "--enforce-eager" in out
    assert "AMYGDALA_READOUT" not in out and KEY not in out
