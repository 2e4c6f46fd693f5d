"""Placed steering and the server-wide default in the request spec and ``amygdala serve``,
without a vLLM engine (the engine side: tests/test_serve_steer_positions.py)."""

from __future__ import annotations

import argparse
import json

import pytest

from helpers import serve as sh
from amygdala.fields import FieldError
from amygdala.serve.spec import RequestSpec, SteerItem, default_steering, parse
from test_serve_spec import SHAPE, small_readout


def test_placement_parses_and_travels_on_the_wire():
    r = small_readout()
    spec = parse({"steer": [{"concept": "calm", "strength": 2, "positions": "generated", "from_token": 3}]}, None, r, SHAPE)
    assert spec.steer == (SteerItem(2.0, (1, 2), "calm", None, "generated", 3),)
    assert spec.steer[0].wire() == {"concept": "calm", "strength": 2.0, "layers": [1, 2], "positions": "generated",
                                    "from_token": 3}
    assert parse({"steer": [{"concept": "calm", "strength": 2}]}, None, r, SHAPE).steer[0].wire() == {
        "concept": "calm", "strength": 2.0, "layers": [1, 2]}  # unplaced: the wire of before


def test_the_placement_is_in_the_prefix_cache_salt():
    items = [SteerItem(2.0, (1,), "calm", None, p, f) for p, f in (("all", None), ("generated", None), ("all", 4))]
    salts = {RequestSpec("raw", (item,)).cache_salt(None) for item in items}
    assert len(salts) == 3 and None not in salts


@pytest.mark.parametrize("item, path", [({"positions": "foo"}, "steer[0].positions"),
                                        ({"positions": ["all"]}, "steer[0].positions"),
                                        ({"from_token": -1}, "steer[0].from_token"),
                                        ({"from_token": True}, "steer[0].from_token"),
                                        ({"from_token": 2.0}, "steer[0].from_token"),
                                        ({"from_token": 10**400}, "steer[0].from_token"),
                                        ({"from_token": 2**31 - 1}, None)])
def test_bad_placement_names_the_field(item, path):
    r = small_readout()
    value = [{"concept": "calm", "strength": 1, **item}]
    if path is None:  # the largest position accepted
        assert parse({"steer": value}, None, r, SHAPE).steer[0].from_token == 2**31 - 1
        return
    with pytest.raises(FieldError) as e:
        parse({"steer": value}, None, r, SHAPE)
    assert e.value.path == path


def test_default_applies_only_without_a_steer_of_the_request():
    r = small_readout()
    default = default_steering(json.dumps([{"concept": "angry", "strength": -3, "positions": "generated"}]), r, SHAPE)
    assert default == (SteerItem(-3.0, (1, 2), "angry", None, "generated"),)
    assert parse({}, None, r, SHAPE, default).steer == default
    assert parse({"steer": None}, None, r, SHAPE, default).steer == default
    assert parse({"steer": []}, None, r, SHAPE, default).steer == ()
    assert parse({}, {"steer": "[]"}, r, SHAPE, default).steer == ()
    own = parse({"steer": [{"concept": "calm", "strength": 1}]}, None, r, SHAPE, default).steer
    assert [s.concept for s in own] == ["calm"]
    assert default_steering(None, r, SHAPE) == default_steering("", r, SHAPE) == ()


def test_a_bad_default_names_the_variable_and_the_item():
    with pytest.raises(FieldError, match=r"^AMYGDALA_DEFAULT_STEER steer\[0\]\.concept: "):
        default_steering(json.dumps([{"concept": "nope", "strength": 1}]), small_readout(), SHAPE)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    pytest.importorskip("vllm")  # amygdala serve needs it installed, though nothing starts here
    return sh.make_files(tmp_path_factory.mktemp("serve-steer"))


def _serve(files, *flags):
    from amygdala.cli import serve as cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", str(files[1]), "--readout", str(files[2]), "--dry-run", *flags])
    return args.func(args)


def test_serve_steer_sets_the_default_for_the_server(files, capsys):
    assert _serve(files, "--steer", "calm=8", "--steer", "angry=-2", "--steer-positions", "generated") == 0
    out = capsys.readouterr().out
    assert "AMYGDALA_DEFAULT_STEER=" in out
    import shlex

    value = next(w.split("=", 1)[1] for w in shlex.split(out) if w.startswith("AMYGDALA_DEFAULT_STEER="))
    assert json.loads(value) == [{"concept": "calm", "strength": 8.0, "positions": "generated"},
                                 {"concept": "angry", "strength": -2.0, "positions": "generated"}]
    assert _serve(files) == 0 and "AMYGDALA_DEFAULT_STEER" not in capsys.readouterr().out


@pytest.mark.parametrize("flags, says", [(["--steer", "nope=1"], "steer[0].concept"),
                                         (["--steer", "calm=1", "--steer-positions", "foo"], "--steer-positions"),
                                         (["--steer", "calm=1", "--steer-from", "-2"], "--steer-from"),
                                         (["--steer", "calm=1e9"], "steer[0].strength")])
def test_serve_bad_steer_exits_2_naming_it(files, capsys, flags, says):
    from amygdala.cli.main import main

    assert main(["serve", "--model", str(files[1]), "--readout", str(files[2]), "--dry-run", *flags]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
