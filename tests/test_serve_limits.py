"""The server's request limits without vLLM: the /train body cap, huge numbers in readout and
steering fields, the steering-strength bound, and a 400 (not a 500) from a malformed body.

Formerly part of tests/test_hardening.py (issue 14).
"""

from __future__ import annotations

import json

import pytest

from helpers.training import HUGE, KEY


def _client(monkeypatch, **env: str):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from amygdala.serve import config, finetune_routes

    monkeypatch.setenv(config.API_KEY_ENV, KEY)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    app = FastAPI()
    finetune_routes.TrainingRoutes().attach(app)
    return TestClient(app, headers={"Authorization": f"Bearer {KEY}"})


def test_train_body_is_capped_whether_declared_or_streamed(monkeypatch):
    client = _client(monkeypatch, AMYGDALA_TRAIN_MAX_BODY="6000")
    body = json.dumps({"samples": [{"context_ids": [2] * 3000, "continuation_ids": [3]}]}).encode()
    r = client.post("/train", content=body)
    assert r.status_code == 413 and r.json()["error"]["param"] == "body" and "AMYGDALA_TRAIN_MAX_BODY" in r.json()["error"]["message"]
    r = client.post("/train", content=(body[i : i + 100] for i in range(0, len(body), 100)))  # chunked: no Content-Length
    assert r.status_code == 413 and r.json()["error"]["type"] == "RequestTooLargeError"
    r = client.post("/train", content=b'{"samples": [' + b"7" * 5000 + b"]}")  # past Python's int-parsing limit
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"


def test_a_bad_max_body_setting_names_the_variable(monkeypatch):
    from amygdala.serve.config import ConfigError

    for value in ("lots", "-1", "inf"):
        with pytest.raises(ConfigError, match=rf"^AMYGDALA_TRAIN_MAX_BODY={value!r}: "):
            _client(monkeypatch, AMYGDALA_TRAIN_MAX_BODY=value)


@pytest.fixture(scope="module")
def readout(tmp_path_factory):
    from helpers.serve import make_readout

    from amygdala.readout import Readout

    return Readout.load(make_readout(tmp_path_factory.mktemp("readout") / "r"))


def _spec(readout, fields: dict, max_strength: float = 1000.0):
    from amygdala.serve.spec import ModelShape, parse

    return parse(fields, None, readout, ModelShape(4, 128, max_strength))


@pytest.mark.parametrize("fields, param", [
    ({"steer": [{"concept": "calm", "strength": HUGE}]}, "steer[0].strength"),
    ({"steer": [{"concept": "calm", "strength": -HUGE}]}, "steer[0].strength"),
    ({"steer": [{"concept": "calm", "strength": 1.0, "layers": [HUGE]}]}, "steer[0].layers"),
    ({"steer": [{"vector": [HUGE] + [0.0] * 127, "strength": 1.0}]}, "steer[0].vector"),
    ({"steer": [{"vector": [1e300] * 128, "strength": 1.0}]}, "steer[0].vector"),
    ({"steer": [{"vector": [1e-300] * 128, "strength": 1.0}]}, "steer[0].vector"),
    ({"readout": 10**5000}, "readout"),
    ({"readout": HUGE}, "readout"),
])
def test_huge_numbers_in_readout_and_steering_are_field_errors(readout, fields, param):
    from amygdala.fields import FieldError

    with pytest.raises(FieldError) as e:
        _spec(readout, fields)
    assert e.value.path == param and len(str(e.value)) < 300


def test_steering_strength_is_bounded_by_the_setting(readout, monkeypatch):
    from amygdala.serve import config
    from amygdala.fields import FieldError

    for strength in (1e300, 1000.5, -2000, float("inf"), float("nan"), True, "4"):
        with pytest.raises(FieldError, match=r"^steer\[0\]\.strength: must be a number within \+-1000 "):
            _spec(readout, {"steer": [{"concept": "calm", "strength": strength}]})
    assert _spec(readout, {"steer": [{"concept": "calm", "strength": -1000}]}).steer[0].strength == -1000.0
    assert _spec(readout, {"steer": [{"concept": "calm", "strength": 5000}]}, max_strength=10_000).steer[0].strength == 5000.0
    monkeypatch.delenv(config.MAX_STRENGTH_ENV, raising=False)
    assert config.max_steer_strength() == config.DEFAULT_MAX_STRENGTH
    monkeypatch.setenv(config.MAX_STRENGTH_ENV, "50")
    assert config.max_steer_strength() == 50.0
    monkeypatch.setenv(config.MAX_STRENGTH_ENV, "nan")
    with pytest.raises(config.ConfigError, match="^AMYGDALA_MAX_STEER_STRENGTH='nan': "):
        config.max_steer_strength()


from fastapi import Request  # noqa: E402 - for the endpoint's annotations below (resolved at module level)


from pydantic import BaseModel, model_validator  # noqa: E402


class _Body(BaseModel):
    """A request model with a validator that breaks on a malformed body, as vLLM's CompletionRequest's does."""

    options: dict | None = None
    fail: bool = False

    @model_validator(mode="before")
    @classmethod
    def count(cls, data):
        return {**data, "n": len(data["options"]).get("x")} if isinstance(data.get("options"), dict) else data


async def _endpoint(body: _Body, raw: Request):
    from amygdala.serve.routes import BodyCheckedRoute

    setattr(raw.state, BodyCheckedRoute.STARTED, True)
    if body.fail:
        raise RuntimeError("a server bug after the body was read")
    return {"ok": True}


def test_a_request_model_that_raises_on_a_malformed_body_is_a_400_not_a_500():
    """What the fuzzer found: vLLM's CompletionRequest raises AttributeError on ``structured_outputs: 1.5``."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from amygdala.serve.routes import BodyCheckedRoute

    app = FastAPI()
    app.router.add_api_route("/x", _endpoint, methods=["POST"], route_class_override=BodyCheckedRoute)
    client = TestClient(app, raise_server_exceptions=False)
    r = client.post("/x", json={"options": {"a": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body" and "AttributeError" in r.json()["error"]["message"]
    assert client.post("/x", json={"options": 3}).status_code == 422  # FastAPI's own validation answer, unchanged
    assert client.post("/x", json={}).json() == {"ok": True}
    assert client.post("/x", json={"fail": True}).status_code == 500  # after the endpoint started: not the body's fault
