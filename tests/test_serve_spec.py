"""The vLLM plugin's request and response code without vLLM: the request spec (defaults, modes,
precedence, errors naming the field), the prefix-cache salt, the row store and the rewriting of
JSON and streamed responses. Split from tests/test_serve.py, which starts the engine."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch

from helpers import serve as sh
from amygdala.fields import FieldError
from amygdala.readout import Readout
from amygdala.serve.proxy import Exchange, RowStore
from amygdala.serve.respond import Formatter, rewrite_json, rewrite_stream
from amygdala.serve.spec import ModelShape, RequestSpec, SteerItem, parse

SHAPE = ModelShape(num_layers=4, hidden_size=8)


def small_readout(stats: bool = True) -> Readout:
    g = torch.Generator().manual_seed(0)
    vectors = {l: torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=1) for l in (1, 2)}
    mean = {l: torch.randn(3, generator=g) for l in (1, 2)} if stats else None
    std = {l: torch.rand(3, generator=g) + 0.5 for l in (1, 2)} if stats else None
    return Readout(["calm", "angry", "joyful"], [1, 2], vectors, mean, std)


def test_spec_defaults_modes_and_precedence():
    r = small_readout()
    assert parse({}, None, r, SHAPE) == RequestSpec("raw")
    assert parse({}, None, None, SHAPE) == RequestSpec(None)
    assert parse({"readout": False}, None, r, SHAPE).readout is None
    assert parse({"readout": None}, None, r, SHAPE).readout is None
    assert parse({"readout": "zscore"}, None, r, SHAPE).readout == "zscore"
    assert parse({}, {"readout": "false", "other": 1}, r, SHAPE).readout is None
    assert parse({"readout": True}, {"readout": "false"}, r, SHAPE).readout == "raw"
    spec = parse({"steer": {"concept": "calm", "strength": 2, "layers": [-2]}}, None, r, SHAPE)
    assert spec.steer == (SteerItem(2.0, (2,), "calm"),)
    spec = parse({}, {"steer": json.dumps([{"vector": [1] * 8, "strength": -1.5}])}, r, SHAPE)
    assert spec.steer[0].vector == (1.0,) * 8 and spec.steer[0].layers == (1, 2)
    assert spec.wire("t") == {"tag": "t", "steer": [{"strength": -1.5, "layers": [1, 2], "vector": [1.0] * 8}]}
    assert RequestSpec(None, spec.steer).wire("t")["tag"] is None
    prompt = parse({"readout_prompt": True}, None, r, SHAPE)
    assert prompt.prompt and prompt.wire("t") == {"tag": "t", "steer": [], "prompt": True}
    assert not parse({"readout_prompt": "false"}, None, r, SHAPE).prompt
    # Every prompt-reading request gets a salt of its own: a prefix-cache hit would skip positions.
    assert prompt.cache_salt(None) != prompt.cache_salt(None) and RequestSpec("raw").cache_salt("u") == "u"


@pytest.mark.parametrize(
    "fields, stats, loaded, param, words",
    [
        ({"readout": "zscore"}, False, True, "readout", ["statistics"]),
        ({"readout": True}, True, False, "readout", ["AMYGDALA_READOUT"]),
        ({"steer": [{"concept": "calm", "strength": 1}]}, True, False, "steer", ["AMYGDALA_READOUT"]),
        ({"steer": [{"concept": "calm", "strength": True}]}, True, True, "steer[0].strength", ["True"]),
        ({"steer": [{"concept": "calm", "strength": float("nan")}]}, True, True, "steer[0].strength", ["nan"]),
        ({"steer": [{"concept": "calm", "strength": 1, "scale": 2}]}, True, True, "steer[0]", ["scale"]),
        ({"steer": [{"vector": [0] * 8, "strength": 1}]}, True, True, "steer[0].vector", ["zeros"]),
        ({"steer": [{"concept": "calm", "strength": 1, "layers": []}]}, True, True, "steer[0].layers", ["non-empty"]),
        ({"steer": [{"concept": "anrgy", "strength": 1}]}, True, True, "steer[0].concept", ["angry"]),
        ({"steer": 5}, True, True, "steer", ["list"]),
        ({"readout_prompt": "maybe"}, True, True, "readout_prompt", ["true or false"]),
        ({"readout_prompt": True, "readout": False}, True, True, "readout_prompt", ["turns off"]),
    ],
)
def test_spec_errors_name_the_field(fields, stats, loaded, param, words):
    with pytest.raises(FieldError) as e:
        parse(fields, None, small_readout(stats) if loaded else None, SHAPE)
    assert e.value.path == param
    for w in words:
        assert w in str(e.value)


def test_cache_salt_is_keyed_by_steering():
    r = small_readout()
    a = parse({"steer": [{"concept": "calm", "strength": 2}]}, None, r, SHAPE)
    b = parse({"steer": [{"concept": "calm", "strength": 3}]}, None, r, SHAPE)
    plain = parse({}, None, r, SHAPE)
    assert plain.cache_salt(None) is None and plain.cache_salt("mine") == "mine"
    assert a.cache_salt(None) == a.cache_salt(None) != b.cache_salt(None)
    assert len({a.cache_salt(None), a.cache_salt("u1"), a.cache_salt("u2")}) == 3
    for salt in (a.cache_salt(None), a.cache_salt("x" * 128)):  # vLLM's rules for cache_salt
        assert 0 < len(salt) <= 128 and not set(salt) & set("@/\\\x00")


def test_row_store_waits_and_maps_choices():
    async def scenario():
        store = RowStore(2, timeout=0.2)
        store.open("t")
        waiting = asyncio.ensure_future(store.take("t", 1, 2, 0, 2))
        await asyncio.sleep(0.01)
        both = [0, 1]
        store.deliver("t", "0_req-ab12", 0, np.zeros((2, 3), np.float32), both)
        store.deliver("t", "1_req-ab12", 0, np.ones((2, 3), np.float32), both)
        store.deliver("t", "1_req-ab12", 1, np.full((2, 3), 2, np.float32), both)
        store.deliver("closed", "x", 0, np.zeros((2, 3), np.float32), both)  # dropped
        rows = await waiting
        assert [float(r[0, 0]) for r in rows] == [1.0, 2.0]
        t0 = asyncio.get_running_loop().time()
        assert await store.take("t", 0, 2, 1, 2) == [None]  # never sent: times out once
        assert await store.take("t", 0, 2, 2, 3) == [None]  # then answers at once
        assert asyncio.get_running_loop().time() - t0 < 0.5
        store.close("t")

    asyncio.run(scenario())


def test_stream_rewrite_puts_each_tokens_rows_in_its_chunk():
    r = small_readout()
    fmt = Formatter(r)
    rows = [np.full((2, 3), float(i), np.float32) for i in range(3)]
    ex = Exchange(RequestSpec("raw"), n=1)
    ex.pending[(0, 0)] = list(rows)
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "prompt_token_ids": [1, 2]},
        {"choices": [{"index": 0, "delta": {"content": "a"}, "token_ids": [5]}]},
        {"choices": [{"index": 0, "delta": {"content": "bc"}, "token_ids": [6, 7]}]},
        {"choices": [], "usage": {"completion_tokens": 3}},
    ]

    async def body():
        for e in events:
            yield f"data: {json.dumps(e)}\n\n"
        yield ": keep-alive\n\n"
        yield "data: [DONE]\n\n"

    async def collect():
        return [x async for x in rewrite_stream(body(), ex, fmt, chat=True, forced_ids=True)]

    out = asyncio.run(collect())
    assert out[-2:] == [": keep-alive\n\n", "data: [DONE]\n\n"]
    chunks = [json.loads(x[len("data: "):]) for x in out[:4]]
    assert chunks[0]["prompt_token_ids"] is None and "readout" not in chunks[0]["choices"][0]
    assert chunks[1]["choices"][0]["readout"] == rows[0].tolist() and chunks[1]["choices"][0]["token_ids"] is None
    assert chunks[2]["choices"][0]["readout"] == rows[2].tolist()
    assert chunks[2]["choices"][0]["readout_tokens"] == [rows[1].tolist(), rows[2].tolist()]
    assert ex.pending[(0, 0)] == []
    # Non-streaming, z-scored: every token of each choice (completions: index = prompt * n + choice).
    ex = Exchange(RequestSpec("zscore"), n=2)
    ex.pending[(1, 1)] = list(rows[:2])
    payload = rewrite_json({"choices": [{"index": 3}]}, ex, fmt, chat=False)
    mean = torch.stack([r.mean[l] for l in r.layers])
    std = torch.stack([r.std[l] for l in r.layers])
    want = (torch.tensor(np.stack(rows[:2])) - mean) / std
    torch.testing.assert_close(torch.tensor(payload["choices"][0]["readout"]), want)


def test_worker_rows_carry_the_tracks_and_the_formatter_splits_them(tmp_path):
    """The worker's projection (hooks.read_matrix: concepts, then tracks, in one matmul) and the
    API side's split (Formatter) give exactly Readout.zscore / Readout.track_zscore of the separate
    projections; a file without tracks gives plain concept rows and no track fields."""
    from amygdala.serve.hooks import read_matrix

    new = Readout.load(sh.make_readout(tmp_path / "new", hidden=16, tracks=True))
    old = Readout.load(sh.make_readout(tmp_path / "old", hidden=16))
    h = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))  # 5 tokens' block outputs
    for r in (new, old):
        rows = torch.stack([h @ read_matrix(r, l).T for l in r.layers], dim=1).numpy()  # [5, L, C + T]
        concepts = torch.stack([h @ r.vectors[l].T for l in r.layers], dim=1)
        fmt = Formatter(r)
        for i in range(5):
            torch.testing.assert_close(torch.tensor(fmt.row(rows[i], "raw")), concepts[i])
            torch.testing.assert_close(torch.tensor(fmt.row(rows[i], "zscore")), r.zscore(concepts[i]), atol=1e-5, rtol=1e-5)
        if r is old:
            assert rows.shape[-1] == len(r.concepts) and fmt.tracks(rows[0], "zscore") is None
            payload = rewrite_json({"choices": [{"index": 0}]}, _exchange("zscore", list(rows)), fmt, chat=True)
            assert "tracks" not in payload["choices"][0]
            continue
        tracks = torch.stack([h @ r.track_vectors[l].T for l in r.layers], dim=1)
        for i in range(5):
            torch.testing.assert_close(torch.tensor(fmt.tracks(rows[i], "raw")), tracks[i])
            torch.testing.assert_close(torch.tensor(fmt.tracks(rows[i], "zscore")), r.track_zscore(tracks[i]), atol=1e-5, rtol=1e-5)
        payload = rewrite_json({"choices": [{"index": 0}]}, _exchange("zscore", list(rows)), fmt, chat=True)
        torch.testing.assert_close(torch.tensor(payload["choices"][0]["tracks"]), r.track_zscore(tracks), atol=1e-5, rtol=1e-5)


def _exchange(mode: str, rows: list) -> Exchange:
    ex = Exchange(RequestSpec(mode), n=1)
    ex.pending[(0, 0)] = rows
    return ex
