"""The vLLM plugin on the real CPU build of vLLM: readout, steering, prefix cache, bad input.

One tiny random Llama (hidden 128, head_dim 64) and its random readout (with tracks and both
statistics sets, as builds since issue 23 write it; files without them run in the other vLLM
modules: test_serve_live.py, test_serve_parallel.py, ...); two server processes
per module: the server under test (readout loaded, prefix caching and cached-token counts on)
and a plain vLLM server without the plugin (the reference for "no steering at all"). References
for the scores come from amygdala's transformers readout (:func:`amygdala.readout.attach`) on
the same tokens. Beside it: tests/test_serve_spec.py (the request and response code, no vLLM),
tests/test_serve_start.py (what stops a server at start), tests/test_serve_default_model.py.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import pytest
import torch

from helpers import serve as sh
from helpers.parity import ATOL, RTOL, assert_parity, body, chat_body, reference, streamed_rows
from amygdala.readout import Steering, attach

#: Tests that start vLLM; the others (request parsing, response rewriting) run anywhere.
vllm = pytest.mark.vllm


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return sh.make_files(tmp_path_factory.mktemp("serve"), tracks=True)


@pytest.fixture(scope="module")
def servers(files):
    """(server with the plugin, plain vLLM server); both started at once to save time."""
    pytest.importorskip("vllm")
    root, model, readout, _ = files
    plain = sh.start_server(model, root / "plain.log", env=sh.server_env(None, VLLM_PLUGINS=""), wait=False)
    main = sh.start_server(
        model, root / "main.log", readout=readout, wait=False,
        args=["--enable-prefix-caching", "--enable-prompt-tokens-details"],
    )
    try:
        sh.wait_ready(plain, 300)
        sh.wait_ready(main, 300)
        yield main, plain
    finally:
        main.stop()
        plain.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


# --------------------------------------------------------------------------- manifest, shapes
@vllm
def test_manifest(server, readout):
    code, m = server.get("/readout/manifest")
    assert code == 200
    assert m["concepts"] == readout.concepts and m["layers"] == readout.layers and m["hidden_size"] == 128
    # mean/std: the default statistics (emotional, in this file); every set under statistics_sets.
    torch.testing.assert_close(torch.tensor(m["std"]), torch.stack([readout.emotional_std[l] for l in readout.layers]))
    torch.testing.assert_close(torch.tensor(m["statistics_sets"]["neutral"]["std"]), torch.stack([readout.std[l] for l in readout.layers]))
    assert m["tracks"] == ["emotionality", "valence"] and m["statistics"]["default"] == "emotional"
    from amygdala.readout import DEFAULT_SMOOTH

    assert m["smooth"] == DEFAULT_SMOOTH


@vllm
def test_manifest_404_without_readout(servers):
    _, plain = servers
    code, _ = plain.get("/readout/manifest")
    assert code == 404


@vllm
def test_completion_readout_shape_and_parity(server, files, hf, readout):
    code, r = server.post("/completions", body(files, sh.prompt_words(12), max_tokens=10, return_token_ids=True))
    assert code == 200, r
    choice = r["choices"][0]
    rows = choice["readout"]
    assert len(rows) == r["usage"]["completion_tokens"] == 10
    assert all(len(row) == 2 and all(len(layer) == 5 for layer in row) for row in rows)
    assert_parity(hf, readout, choice["prompt_token_ids"], choice["token_ids"], rows)


@vllm
def test_prompt_readout_matches_teacher_forcing_even_on_a_cached_prefix(server, files, hf, readout):
    """``readout_prompt``: row i of the prompt is the block output at position i - 1 (the one
    that "sampled" token i), null for token 0; the same with n = 2, streamed, and when a plain
    request has just cached the prompt's KV (the prompt readout must compute every position)."""
    prompt = sh.prompt_words(40, seed=7)  # longer than a KV block, so the prefix cache could hit
    plain = body(files, prompt, max_tokens=3, return_token_ids=True)
    server.post("/completions", plain)  # caches the prompt's blocks for unsalted requests
    code, r = server.post("/completions", {**plain, "readout_prompt": True, "n": 2, "temperature": 1.0, "seed": 3})
    assert code == 200, r
    ids = r["choices"][0]["prompt_token_ids"]
    scores, _ = reference(hf, readout, ids)
    for choice in r["choices"]:
        assert len(choice["prompt_readout"]) == len(choice["prompt_tokens"]) == len(ids)
        assert choice["prompt_readout"][0] is None
        torch.testing.assert_close(torch.tensor(choice["prompt_readout"][1:]), scores[: len(ids) - 1], atol=ATOL, rtol=RTOL)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(files[1])
    assert r["choices"][0]["prompt_tokens"] == [tok.decode([i]) for i in ids]
    assert "prompt_readout" not in server.post("/completions", plain)[1]["choices"][0]  # off by default
    chunks = server.stream("/chat/completions", chat_body(files, prompt, readout_prompt=True, readout="zscore"))
    first = chunks[0]["choices"][0]
    assert "prompt_readout" in first and sum("prompt_readout" in ch for c in chunks for ch in c["choices"]) == 1
    assert len(first["prompt_readout"]) == len(first["prompt_tokens"]) > 40


@vllm
def test_steered_parity_with_transformers_steering(server, files, hf, readout):
    steer = [{"concept": "calm", "strength": 6.0}, {"concept": "angry", "strength": -3.0, "layers": [2]}]
    code, r = server.post("/completions", body(files, sh.prompt_words(12, seed=3), steer=steer, return_token_ids=True))
    assert code == 200, r
    c = r["choices"][0]
    steering = Steering.from_concepts(readout, {"calm": 6.0}) + Steering.from_concepts(readout, {"angry": -3.0}, [2])
    assert_parity(hf, readout, c["prompt_token_ids"], c["token_ids"], c["readout"], steering)


@vllm
def test_raw_vector_steering_parity(server, files, hf, readout):
    g = torch.Generator().manual_seed(5)
    v = torch.randn(128, generator=g)
    steer = [{"vector": v.tolist(), "strength": 8.0, "layers": [0, 3]}]
    code, r = server.post("/completions", body(files, sh.prompt_words(10, seed=4), steer=steer, return_token_ids=True))
    assert code == 200, r
    c = r["choices"][0]
    assert_parity(hf, readout, c["prompt_token_ids"], c["token_ids"], c["readout"], Steering.from_vector(v, 8.0, [0, 3]))


@vllm
def test_several_prompts_and_n_choices_keep_their_own_rows(server, files, hf, readout):
    """Rows must find their choice: completions number choices prompt * n + choice."""
    prompts = [sh.prompt_words(9, seed=20), sh.prompt_words(14, seed=21)]
    code, r = server.post(
        "/completions",
        body(files, prompts, n=2, temperature=1.0, seed=7, max_tokens=6, return_token_ids=True),
    )
    assert code == 200, r
    assert sorted(c["index"] for c in r["choices"]) == [0, 1, 2, 3]
    for c in r["choices"]:
        assert_parity(hf, readout, c["prompt_token_ids"], c["token_ids"], c["readout"], greedy=False)
    assert r["choices"][0]["token_ids"] != r["choices"][1]["token_ids"]


# --------------------------------------------------------------------------- streaming, modes
@vllm
def test_stream_chunks_carry_their_token_rows(server, files):
    b = body(files, sh.prompt_words(12, seed=1), max_tokens=8)
    _, full = server.post("/completions", b)
    chunks = server.stream("/completions", b)
    assert all("readout" in c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["text"])
    torch.testing.assert_close(torch.tensor(streamed_rows(chunks)), torch.tensor(full["choices"][0]["readout"]))
    # The token ids the plugin asks vLLM for are not shown unless the client asked for them.
    assert all(c["choices"][0].get("token_ids") is None for c in chunks if c["choices"])


@vllm
def test_stream_interval_chunks_list_every_token(server, files):
    b = body(files, sh.prompt_words(12, seed=1), max_tokens=9)
    _, full = server.post("/completions", b)
    chunks = server.stream("/completions", {**b, "stream_interval": 3})
    assert any(len(ch.get("readout_tokens", ())) == 3 for c in chunks for ch in c["choices"])
    torch.testing.assert_close(torch.tensor(streamed_rows(chunks)), torch.tensor(full["choices"][0]["readout"]))


@vllm
def test_stream_with_echo(server, files):
    b = body(files, sh.prompt_words(6, seed=2), max_tokens=5, echo=True)
    _, full = server.post("/completions", b)
    chunks = server.stream("/completions", b)
    rows = streamed_rows(chunks)
    assert "".join(ch["text"] for c in chunks for ch in c["choices"]) == full["choices"][0]["text"]
    torch.testing.assert_close(torch.tensor(rows), torch.tensor(full["choices"][0]["readout"]))


@vllm
def test_readout_off_and_zscore(server, files, readout):
    b = body(files, sh.prompt_words(12, seed=1), max_tokens=4)
    _, raw = server.post("/completions", b)
    code, off = server.post("/completions", {**b, "readout": False})
    assert code == 200 and "readout" not in off["choices"][0]
    assert off["choices"][0]["text"] == raw["choices"][0]["text"]
    _, z = server.post("/completions", {**b, "readout": "zscore"})
    want = readout.zscore(torch.tensor(raw["choices"][0]["readout"]))  # the file's default statistics
    torch.testing.assert_close(torch.tensor(z["choices"][0]["readout"]), want, atol=1e-4, rtol=1e-4)
    want = readout.track_zscore(torch.tensor(raw["choices"][0]["tracks"]))  # tracks: over neutral text
    torch.testing.assert_close(torch.tensor(z["choices"][0]["tracks"]), want, atol=1e-4, rtol=1e-4)
    chunks = server.stream("/completions", {**b, "readout": False})
    assert not any("readout" in ch for c in chunks for ch in c["choices"])


@vllm
def test_tracks_match_transformers_per_token_streamed_and_for_the_prompt(server, files, hf, readout):
    """The emotionality and valence tracks travel beside every token's readout: equal to the
    transformers readout's track projections (``ReadoutSession.tracks``) at the same positions,
    streamed chunk by chunk (``tracks_tokens`` when a chunk carries several) and for the prompt."""
    b = body(files, sh.prompt_words(12, seed=4), max_tokens=6, return_token_ids=True, readout_prompt=True)
    code, r = server.post("/completions", b)
    assert code == 200, r
    c = r["choices"][0]
    ids = c["prompt_token_ids"] + c["token_ids"]
    with attach(hf, readout) as session, torch.no_grad():
        hf(torch.tensor([ids]))
    want = session.tracks()[0]  # [positions, n_layers, n_tracks]
    p = len(c["prompt_token_ids"])
    assert len(c["tracks"]) == len(c["readout"]) == len(c["token_ids"])
    torch.testing.assert_close(torch.tensor(c["tracks"]), want[p - 1 : p - 1 + len(c["token_ids"])], atol=ATOL, rtol=RTOL)
    assert c["prompt_tracks"][0] is None
    torch.testing.assert_close(torch.tensor(c["prompt_tracks"][1:]), want[: p - 1], atol=ATOL, rtol=RTOL)
    chunks = server.stream("/completions", {**b, "return_token_ids": False, "stream_interval": 2})
    got = []
    for ch in (ch for x in chunks for ch in x["choices"] if "readout" in ch):
        many = ch.get("tracks_tokens", [ch["tracks"]])
        assert ch["tracks"] == many[-1] and len(many) == len(ch.get("readout_tokens", [ch["readout"]]))
        got += many
    assert any("tracks_tokens" in ch for x in chunks for ch in x["choices"])
    torch.testing.assert_close(torch.tensor(got), torch.tensor(c["tracks"]))


@vllm
def test_chat_completions(server, files, hf, readout):
    b = chat_body(files, "w1 w2 w3 w4", return_token_ids=True)
    code, r = server.post("/chat/completions", b)
    assert code == 200, r
    c = r["choices"][0]
    assert len(c["readout"]) == r["usage"]["completion_tokens"]
    assert_parity(hf, readout, r["prompt_token_ids"], c["token_ids"], c["readout"])
    chunks = server.stream("/chat/completions", {**b, "return_token_ids": False})
    assert "readout" not in chunks[0]["choices"][0]  # the role chunk carries no token
    torch.testing.assert_close(torch.tensor(streamed_rows(chunks)), torch.tensor(c["readout"]))
    assert all(x.get("prompt_token_ids") is None for x in chunks)


@vllm
def test_openai_client_reads_streamed_readout(server, files):
    from openai import OpenAI

    client = OpenAI(base_url=server.url, api_key="unused")
    stream = client.completions.create(
        model=str(files[1]), prompt=sh.prompt_words(8, seed=9), max_tokens=5, temperature=0, stream=True
    )
    rows = []
    for chunk in stream:
        if chunk.choices and getattr(chunk.choices[0], "readout", None) is not None:
            rows += getattr(chunk.choices[0], "readout_tokens", None) or [chunk.choices[0].readout]
    assert len(rows) == 5 and all(len(r) == 2 and len(r[0]) == 5 for r in rows)
    stream = client.chat.completions.create(
        model=str(files[1]), messages=[{"role": "user", "content": "w5 w6"}], max_tokens=4,
        temperature=0, stream=True, extra_body={"readout": "zscore", "steer": [{"concept": "joyful", "strength": 2.0}]},
    )
    rows = []
    for chunk in stream:
        if chunk.choices and getattr(chunk.choices[0], "readout", None) is not None:
            rows += getattr(chunk.choices[0], "readout_tokens", None) or [chunk.choices[0].readout]
    assert len(rows) == 4


# --------------------------------------------------------------------------- steering isolation
def _tokens(server, files, prompt, **kw) -> list[int]:
    code, r = server.post("/completions", body(files, prompt, max_tokens=24, return_token_ids=True, **kw))
    assert code == 200, r
    return r["choices"][0]["token_ids"]


@vllm
def test_steering_is_per_request_within_a_batch(servers, files):
    server, plain = servers
    p_steer, p_plain, p_other = (sh.prompt_words(30, seed=s) for s in (40, 41, 42))
    steer = [{"concept": "afraid", "strength": 30.0}]
    alone_plain = _tokens(plain, files, p_plain)
    alone_other = _tokens(plain, files, p_other)
    unsteered_steer_prompt = _tokens(plain, files, p_steer)
    steered_alone = _tokens(server, files, p_steer, steer=steer)
    # Three requests in flight together: one steered, two not.
    for _ in range(2):
        with cf.ThreadPoolExecutor(3) as ex:
            a = ex.submit(_tokens, server, files, p_steer, steer=steer)
            b = ex.submit(_tokens, server, files, p_plain)
            c = ex.submit(_tokens, server, files, p_other, readout=False)
            a, b, c = a.result(), b.result(), c.result()
        assert b == alone_plain and c == alone_other
        assert a == steered_alone and a != unsteered_steer_prompt


@vllm
def test_steering_in_vllm_xargs(server, files):
    prompt = sh.prompt_words(10, seed=50)
    steer = [{"concept": "curious", "strength": 12.0}]
    top = server.post("/completions", body(files, prompt, steer=steer, readout="zscore"))[1]["choices"][0]
    xargs = {"steer": json.dumps(steer), "readout": "zscore", "other": 1}
    via = server.post("/completions", body(files, prompt, vllm_xargs=xargs))[1]["choices"][0]
    plain = server.post("/completions", body(files, prompt))[1]["choices"][0]
    assert via["text"] == top["text"] != plain["text"]
    torch.testing.assert_close(torch.tensor(via["readout"]), torch.tensor(top["readout"]))


# --------------------------------------------------------------------------- prefix cache guard
def _cached(r) -> int:
    return (r["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0


@vllm
def test_steered_kv_never_serves_unsteered_requests(server, files):
    """Fails without the guard (checked by switching it off): the unsteered request reuses the
    steered request's first KV block (CPU block size 128, so 128 of its 131 prompt tokens) and
    continues from KV the steering changed, and its text differs from the reference."""
    prompt = sh.prompt_words(130, seed=61)  # unique to this test: nothing of it is cached yet
    steer = [{"concept": "angry", "strength": 60.0}]
    b = body(files, prompt, max_tokens=12, readout=False)
    reference = server.post("/completions", {**b, "cache_salt": "reference-only"})[1]
    steered = server.post("/completions", {**b, "steer": steer})[1]
    after = server.post("/completions", b)[1]
    assert steered["choices"][0]["text"] != reference["choices"][0]["text"]
    assert after["choices"][0]["text"] == reference["choices"][0]["text"]
    assert _cached(after) == 0
    # The cache is keyed by the steering, not switched off: the same steering reuses its blocks.
    again = server.post("/completions", {**b, "steer": steer})[1]
    assert _cached(again) >= 128 and again["choices"][0]["text"] == steered["choices"][0]["text"]


# --------------------------------------------------------------------------- bad input
BAD = [
    ({"steer": [{"concept": "calmm", "strength": 2}]}, "steer[0].concept", ["'calmm'", "calm"]),
    ({"steer": [{"concept": "calm", "strength": "lots"}]}, "steer[0].strength", ["'lots'"]),
    ({"steer": [{"concept": "calm", "strength": 1, "layers": [9]}]}, "steer[0].layers", ["0-3"]),
    ({"steer": [{"concept": "calm", "strength": 1, "layers": [0]}]}, "steer[0].layers", ["[1, 2]"]),
    ({"steer": [{"vector": [1.0, 2.0], "strength": 1}]}, "steer[0].vector", ["128"]),
    ({"steer": [{"strength": 1}]}, "steer[0]", ["exactly one"]),
    ({"steer": "[{not json"}, "steer", ["JSON"]),
    ({"readout": "loud"}, "readout", ["'loud'"]),
    ({"vllm_xargs": {"steer": json.dumps([{"concept": "angri", "strength": 1}])}}, "steer[0].concept", ["angry"]),
]


@vllm
def test_bad_input_is_a_400_that_names_the_field_and_disturbs_nothing(server, files):
    long_body = body(files, sh.prompt_words(20, seed=70), max_tokens=120)
    _, expected = server.post("/completions", long_body)
    with cf.ThreadPoolExecutor(1) as ex:
        running = ex.submit(server.stream, "/completions", long_body)
        time.sleep(0.05)
        for extra, param, words in BAD:
            code, r = server.post("/completions", body(files, "w1 w2", **extra))
            assert code == 400, (extra, r)
            assert r["error"]["param"] == param, r
            for w in words:
                assert w in r["error"]["message"], (w, r)
        code, r = server.post("/chat/completions", chat_body(files, "w1", steer=[{"concept": "joyfull", "strength": 1}]))
        assert code == 400 and "joyful" in r["error"]["message"]
        chunks = running.result()
    text = "".join(ch["text"] for c in chunks for ch in c["choices"])
    assert text == expected["choices"][0]["text"]
    torch.testing.assert_close(torch.tensor(streamed_rows(chunks)), torch.tensor(expected["choices"][0]["readout"]))


@vllm
def test_plain_server_is_untouched(servers, files):
    """Without the plugin enabled, readout/steer fields are ignored like any unknown field."""
    _, plain = servers
    code, r = plain.post("/completions", body(files, "w1 w2 w3", steer=[{"concept": "nope", "strength": "x"}]))
    assert code == 200 and "readout" not in r["choices"][0]
