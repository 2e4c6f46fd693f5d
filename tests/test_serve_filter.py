"""A readout you can filter, on the server: ``"readout": {"concepts", "clusters", "layers",
"top_k", "summary", "mode"}``.

The request checks and the response rewriting run without vLLM; the rest on one shared engine
(the tiny random Llama of tests/test_serve.py, its readout with tracks, concepts given clusters).
Every filtered value is compared with the same request unfiltered: the matching slice, an
independent argsort for ``top_k``, numpy's mean/max for ``summary``.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from helpers import serve as sh
from amygdala.fields import FieldError
from amygdala.readout import Readout
from amygdala.serve.proxy import Exchange
from amygdala.serve.respond import Formatter, rewrite_json, rewrite_stream
from amygdala.serve.spec import ModelShape, RequestSpec, parse

vllm = pytest.mark.vllm
SHAPE = ModelShape(num_layers=sh.NUM_LAYERS, hidden_size=sh.HIDDEN)
#: sh.CONCEPTS = calm, angry, joyful, afraid, curious
CLUSTERS = ["peace", "anger", "joy", "fear", "joy"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-filter")
    model = sh.make_tiny_model(root / "model")
    path = sh.make_readout(root / "readout", tracks=True)
    r = Readout.load(path)
    r.meta["clusters"] = CLUSTERS
    r.save(path)
    return root, model, path


@pytest.fixture(scope="module")
def server(files):
    pytest.importorskip("vllm")
    root, model, path = files
    s = sh.start_server(model, root / "main.log", readout=path, one_process=True)
    try:
        yield s
    finally:
        s.stop()


def body(files, prompt, **kw) -> dict:
    return {"model": str(files[1]), "prompt": prompt, "temperature": 0, "max_tokens": 6, **kw}


# --------------------------------------------------------------------------- request checks (no vLLM)
def test_filter_parses_names_clusters_layers_and_mode(readout):
    spec = parse({"readout": {"concepts": ["joyful"], "clusters": ["fear"], "layers": [2], "mode": "zscore"}},
                 None, readout, SHAPE)
    assert spec.readout == "zscore" and spec.filter is not None
    assert spec.filter.names == ("joyful", "afraid") and spec.filter.layer_ids == (2,)
    assert parse({"readout": {"clusters": ["joy"]}}, None, readout, SHAPE).filter.names == ("joyful", "curious")
    # In vllm_xargs the object is a JSON string, as steer's list is; top level still wins.
    xargs = {"readout": json.dumps({"concepts": ["calm"], "top_k": 1})}
    assert parse({}, xargs, readout, SHAPE).filter.top_k == 1
    assert parse({"readout": True}, xargs, readout, SHAPE) == RequestSpec("raw")
    # No filter keys, or the readout off: no filter, the plain mode's response.
    assert parse({"readout": {"mode": "zscore"}}, None, readout, SHAPE) == RequestSpec("zscore")
    assert parse({"readout": {"mode": False, "concepts": ["calm"]}}, None, readout, SHAPE) == RequestSpec(None)


BAD = [
    ({"concepts": ["joyfull"]}, "readout.concepts", ["unknown concept", "joyful"]),
    ({"concepts": "calm"}, "readout.concepts", ["list of names"]),
    ({"concepts": []}, "readout.concepts", ["non-empty"]),
    ({"clusters": ["fearr"]}, "readout.clusters", ["unknown cluster", "fear"]),
    ({"layers": [3]}, "readout.layers", ["not one of the readout's layers [1, 2]"]),
    ({"layers": [True]}, "readout.layers", ["list"]),
    ({"top_k": 0}, "readout.top_k", ["1 to 5"]),
    ({"top_k": 3, "concepts": ["calm", "angry"]}, "readout.top_k", ["1 to 2"]),
    ({"top_k": 1.5}, "readout.top_k", ["1.5"]),
    ({"top_k": 10**400}, "readout.top_k", ["characters"]),
    ({"summary": "yes"}, "readout.summary", ["true or false"]),
    ({"summary": True, "top_k": 1}, "readout.top_k", ["summary replaces"]),
    ({"mode": "loud"}, "readout", ["'raw' or 'zscore'"]),
    ({"colour": 1}, "readout", ["unknown key", "colour"]),
]


@pytest.mark.parametrize("value, param, words", BAD)
def test_bad_filters_name_the_field(readout, value, param, words):
    with pytest.raises(FieldError) as e:
        parse({"readout": value}, None, readout, SHAPE)
    assert e.value.path == param
    for w in words:
        assert w in str(e.value)


def test_clusters_need_a_readout_that_records_them():
    r = Readout(["a", "b"], [1], {1: np.eye(2, 8, dtype=np.float32)}, None, None)
    with pytest.raises(FieldError, match="records no clusters"):
        parse({"readout": {"clusters": ["x"]}}, None, r, SHAPE)
    r.meta["clusters"] = ["x", None]  # a concept without a cluster is in none (and no 500)
    assert parse({"readout": {"clusters": ["x"]}}, None, r, SHAPE).filter.names == ("a",)
    with pytest.raises(FieldError, match="nearest: x"):
        parse({"readout": {"clusters": ["None"]}}, None, r, SHAPE)


# --------------------------------------------------------------------------- response rewriting (no vLLM)
def rows_of(readout, n: int, seed: int = 0) -> list[np.ndarray]:
    """Worker rows [n_layers, n_concepts + n_tracks], random."""
    rng = np.random.default_rng(seed)
    width = len(readout.concepts) + len(readout.track_names)
    return [rng.normal(size=(len(readout.layers), width)).astype(np.float32) for _ in range(n)]


def test_json_rewrite_slices_tops_and_summarizes(readout):
    fmt, rows = Formatter(readout), rows_of(readout, 4)
    full = np.stack([r[:, :5] for r in rows])  # [tokens, layers, concepts]

    def rewrite(value):
        ex = Exchange(parse({"readout": value}, None, readout, SHAPE), n=1)
        ex.pending[(0, 0)] = list(rows)
        return rewrite_json({"choices": [{"index": 0}]}, ex, fmt, chat=True)["choices"][0]

    got = rewrite({"concepts": ["curious", "calm"], "layers": [2]})
    assert got["readout_select"] == {"concepts": ["calm", "curious"], "layers": [2]}
    np.testing.assert_array_equal(np.array(got["readout"]), full[:, [1]][:, :, [0, 4]])
    np.testing.assert_array_equal(np.array(got["tracks"]), np.stack([r[[1], 5:] for r in rows]))

    got = rewrite({"top_k": 2})
    for t, token in enumerate(got["readout"]):
        for j, layer in enumerate(token):
            want = np.argsort(full[t, j])[::-1][:2]  # independent: numpy's argsort, reversed
            assert [name for name, _ in layer] == [sh.CONCEPTS[i] for i in want]
            assert [v for _, v in layer] == pytest.approx(full[t, j, want].tolist())

    got = rewrite({"clusters": ["joy"], "summary": True})
    assert "readout" not in got and got["readout_summary"]["tokens"] == 4
    np.testing.assert_allclose(got["readout_summary"]["mean"], full[:, :, [2, 4]].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(got["readout_summary"]["max"], full[:, :, [2, 4]].max(0))
    assert len(got["tracks"]) == 4  # the tracks stay per token


def test_stream_rewrite_describes_once_and_summarizes_at_the_end(readout):
    fmt, rows = Formatter(readout), rows_of(readout, 3, seed=1)
    ex = Exchange(parse({"readout": {"concepts": ["angry"], "summary": True, "mode": "zscore"}}, None, readout, SHAPE), n=1)
    ex.pending[(0, 0)] = list(rows)
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
        {"choices": [{"index": 0, "delta": {"content": "a"}, "token_ids": [5], "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "bc"}, "token_ids": [6, 7], "finish_reason": "length"}]},
    ]

    async def body():
        for e in events:
            yield f"data: {json.dumps(e)}\n\n"

    async def collect():
        return [json.loads(x[6:]) async for x in rewrite_stream(body(), ex, fmt, chat=True, forced_ids=False)]

    chunks = [c["choices"][0] for c in asyncio.run(collect())]
    assert chunks[0]["readout_select"] == {"concepts": ["angry"], "layers": [1, 2], "summary": True}
    assert not any("readout_select" in c or "readout" in c for c in chunks[1:])
    assert "readout_summary" not in chunks[1]
    z = np.stack([fmt.values(r, "zscore")[:, [1]] for r in rows])
    np.testing.assert_allclose(chunks[2]["readout_summary"]["mean"], z.mean(0), rtol=1e-5)
    np.testing.assert_allclose(chunks[2]["readout_summary"]["max"], z.max(0), rtol=1e-6)


# --------------------------------------------------------------------------- on vLLM
def _streamed(chunks, key="readout"):
    out = []
    for c in chunks:
        for ch in c["choices"]:
            if key + "_tokens" in ch:
                out += ch[key + "_tokens"]
            elif key in ch:
                out.append(ch[key])
    return out


@vllm
def test_filtered_responses_are_slices_of_the_full_one(server, files):
    b = body(files, sh.prompt_words(10, seed=3), readout="zscore")
    code, full = server.post("/completions", b)
    assert code == 200, full
    want = np.array(full["choices"][0]["readout"])  # [tokens, layers, concepts]
    assert want.shape == (6, 2, 5) and "readout_select" not in full["choices"][0]  # unfiltered: as before
    sel = {"mode": "zscore", "concepts": ["afraid"], "clusters": ["anger"], "layers": [2]}
    code, got = server.post("/completions", {**b, "readout": sel})
    assert code == 200, got
    choice = got["choices"][0]
    assert choice["text"] == full["choices"][0]["text"]
    assert choice["readout_select"] == {"concepts": ["angry", "afraid"], "layers": [2]}
    np.testing.assert_allclose(choice["readout"], want[:, [1]][:, :, [1, 3]], rtol=1e-6)
    np.testing.assert_allclose(choice["tracks"], np.array(full["choices"][0]["tracks"])[:, [1]], rtol=1e-6)
    # Streamed: the same slice per token, what it holds said once, in the first chunk.
    chunks = server.stream("/completions", {**b, "readout": sel})
    assert "readout_select" in chunks[0]["choices"][0]
    assert sum("readout_select" in ch for c in chunks for ch in c["choices"]) == 1
    np.testing.assert_allclose(_streamed(chunks), want[:, [1]][:, :, [1, 3]], rtol=1e-6)
    # In vllm_xargs, as a JSON string (without the top-level field, which would win).
    plain = {k: v for k, v in b.items() if k != "readout"}
    code, x = server.post("/completions", {**plain, "vllm_xargs": {"readout": json.dumps(sel)}})
    assert code == 200 and x["choices"][0]["readout"] == choice["readout"]


@vllm
def test_top_k_and_summary_on_the_server(server, files):
    b = body(files, sh.prompt_words(10, seed=4))
    _, full = server.post("/completions", b)
    want = np.array(full["choices"][0]["readout"])
    chunks = server.stream("/completions", {**b, "readout": {"top_k": 2}})
    top = _streamed(chunks)
    assert len(top) == len(want)
    for t, token in enumerate(top):
        for j, layer in enumerate(token):
            order = np.argsort(want[t, j])[::-1][:2]
            assert [n for n, _ in layer] == [sh.CONCEPTS[i] for i in order]
            np.testing.assert_allclose([v for _, v in layer], want[t, j, order], rtol=1e-6)
    for stream in (False, True):
        req = {**b, "readout": {"summary": True}}
        if stream:
            got = [ch for c in server.stream("/completions", req) for ch in c["choices"] if "readout_summary" in ch]
            assert len(got) == 1 and got[0]["finish_reason"] is not None
            summary = got[0]["readout_summary"]
        else:
            _, r = server.post("/completions", req)
            assert "readout" not in r["choices"][0]
            summary = r["choices"][0]["readout_summary"]
        assert summary["tokens"] == len(want)
        np.testing.assert_allclose(summary["mean"], want.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(summary["max"], want.max(0), rtol=1e-6)


@vllm
def test_bad_filters_are_400s_naming_the_field(server, files):
    for value, param, words in BAD:
        code, r = server.post("/completions", body(files, "w1 w2", readout=value))
        assert code == 400, (value, r)
        assert r["error"]["param"] == param, r
        assert all(w in r["error"]["message"] for w in words), r
    code, r = server.post("/completions", body(files, "w1", vllm_xargs={"readout": "{nope"}))
    assert code == 400 and r["error"]["param"] == "readout"
