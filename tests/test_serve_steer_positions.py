"""Placed steering and the server-wide default steering on the real CPU build of vLLM (issue 26).

One server per module: the tiny Llama and its readout, prefix caching on, and a default steering
(``AMYGDALA_DEFAULT_STEER``, what ``amygdala serve --steer`` sets) of calm=6 on generated tokens;
requests that want no steering say ``"steer": []``. References come from amygdala's transformers
steering placed the same way, on the same tokens, with the prompt prefilled first and the
generated tokens run on its KV cache (so transformers knows which positions are the prompt).
The request parsing without vLLM: tests/test_serve_steer_spec.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import serve as sh
from amygdala.readout import Steering, attach

vllm = pytest.mark.vllm
ATOL, RTOL = 2e-3, 1e-4  # as tests/test_serve.py: fp32 vLLM vs transformers
DEFAULT = [{"concept": "calm", "strength": 6.0, "positions": "generated"}]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return sh.make_files(tmp_path_factory.mktemp("steer-positions"))


@pytest.fixture(scope="module")
def server(files):
    pytest.importorskip("vllm")
    root, model, readout, _ = files
    env = sh.server_env(readout, AMYGDALA_DEFAULT_STEER=json.dumps(DEFAULT))
    s = sh.start_server(model, root / "server.log", env=env, args=["--enable-prefix-caching"], wait=False, one_process=True)
    try:
        sh.wait_ready(s, 300)
        yield s
    finally:
        s.stop()


def post(server, files, prompt, **kw) -> dict:
    body = {"model": str(files[1]), "prompt": prompt, "temperature": 0, "max_tokens": 8, "return_token_ids": True,
            "readout_prompt": True, **kw}
    code, r = server.post("/completions", body)
    assert code == 200, r
    return r["choices"][0]


def reference(hf, readout, prompt_ids, gen_ids, steering) -> tuple[torch.Tensor, torch.Tensor]:
    """Transformers scores [T, L, C] and logits [T, vocab]: the prompt prefilled, then the rest on its cache."""
    from transformers import DynamicCache

    ids = torch.tensor([list(prompt_ids) + list(gen_ids)])
    p = len(prompt_ids)
    with torch.no_grad(), attach(hf, readout, steering=steering) as s:
        cache = DynamicCache()
        a = hf(ids[:, :p], past_key_values=cache, use_cache=True).logits[0]
        b = hf(ids[:, p:], past_key_values=cache, use_cache=True).logits[0]
    return s.scores()[0], torch.cat([a, b])


def assert_parity(hf, readout, c, steering) -> None:
    """vLLM's prompt rows (row i = position i - 1) and generated rows (row k = position P - 1 + k)
    are transformers' with the same placed steering, and the greedy tokens its argmax."""
    prompt_ids, gen_ids = c["prompt_token_ids"], c["token_ids"]
    scores, logits = reference(hf, readout, prompt_ids, gen_ids, steering)
    p = len(prompt_ids)
    torch.testing.assert_close(torch.tensor(c["prompt_readout"][1:]), scores[: p - 1], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(torch.tensor(c["readout"]), scores[p - 1 : p - 1 + len(gen_ids)], atol=ATOL, rtol=RTOL)
    assert logits[p - 1 : p - 1 + len(gen_ids)].argmax(-1).tolist() == list(gen_ids)


@vllm
def test_manifest_shows_the_default_steering(server):
    code, m = server.get("/readout/manifest")
    assert code == 200 and m["default_steer"] == [{**DEFAULT[0], "layers": [1, 2]}]


@vllm
def test_the_default_equals_the_same_steer_per_request_and_an_empty_list_replaces_it(server, files, hf, readout):
    prompt = sh.prompt_words(12, seed=4)
    default = post(server, files, prompt)
    own = post(server, files, prompt, steer=DEFAULT)
    assert default["token_ids"] == own["token_ids"] and default["readout"] == own["readout"]
    assert default["prompt_readout"] == own["prompt_readout"]
    assert_parity(hf, readout, default, Steering.from_concepts(readout, {"calm": 6.0}).placed("generated"))
    none = post(server, files, prompt, steer=[])
    assert_parity(hf, readout, none, None)
    assert none["readout"] != default["readout"]


@vllm
def test_generated_only_after_an_unsteered_request_reads_the_unsteered_prompt(server, files, hf, readout):
    """The unsteered request runs first (it may fill the prefix cache); the generated-only one
    then reads the same prompt readout, samples the same first token from it (row 0 is the last
    prompt position), and steers every later row as transformers does."""
    prompt = sh.prompt_words(40, seed=9)  # past a KV block
    plain = post(server, files, prompt, steer=[])
    steer = [{"concept": "calm", "strength": 8.0, "positions": "generated"},
             {"concept": "angry", "strength": -5.0, "layers": [2], "positions": "generated"}]
    placed = post(server, files, prompt, steer=steer)
    assert placed["prompt_readout"] == plain["prompt_readout"]
    assert placed["token_ids"][0] == plain["token_ids"][0] and placed["readout"][0] == plain["readout"][0]
    assert placed["readout"][1:] != plain["readout"][1:]
    steering = (Steering.from_concepts(readout, {"calm": 8.0}) + Steering.from_concepts(readout, {"angry": -5.0}, [2]))
    assert_parity(hf, readout, placed, steering.placed("generated"))


@vllm
def test_prompt_only_steers_the_prompt_and_nothing_after(server, files, hf, readout):
    prompt = sh.prompt_words(12, seed=5)
    plain = post(server, files, prompt, steer=[])
    c = post(server, files, prompt, steer=[{"concept": "joyful", "strength": 7.0, "positions": "prompt"}])
    assert c["prompt_readout"][1:] != plain["prompt_readout"][1:]
    assert_parity(hf, readout, c, Steering.from_concepts(readout, {"joyful": 7.0}).placed("prompt"))


@vllm
def test_from_token_boundary_is_exact_and_mixes_with_an_everywhere_term(server, files, hf, readout):
    prompt = sh.prompt_words(12, seed=6)
    f = 5
    plain = post(server, files, prompt, steer=[])
    c = post(server, files, prompt, steer=[{"concept": "afraid", "strength": 6.0, "layers": [1], "from_token": f}])
    # prompt_readout row i is position i - 1: positions < f unchanged, position f changed
    assert c["prompt_readout"][1 : f + 1] == plain["prompt_readout"][1 : f + 1]
    assert c["prompt_readout"][f + 1][0] != plain["prompt_readout"][f + 1][0]
    assert_parity(hf, readout, c, Steering.from_concepts(readout, {"afraid": 6.0}, [1]).placed(from_token=f))
    both = post(server, files, prompt, steer=[{"concept": "afraid", "strength": 6.0, "layers": [1], "from_token": f},
                                               {"concept": "curious", "strength": 3.0}])
    assert_parity(hf, readout, both, [Steering.from_concepts(readout, {"afraid": 6.0}, [1]).placed(from_token=f),
                                      Steering.from_concepts(readout, {"curious": 3.0})])


@vllm
@pytest.mark.parametrize("item, field", [({"positions": "foo"}, "steer[0].positions"),
                                         ({"from_token": -1}, "steer[0].from_token"),
                                         ({"from_token": True}, "steer[0].from_token")])
def test_bad_placement_is_a_400_naming_the_field(server, files, item, field):
    body = {"model": str(files[1]), "prompt": "w1 w2", "max_tokens": 2, "steer": [{"concept": "calm", "strength": 1, **item}]}
    code, r = server.post("/completions", body)
    assert code == 400 and field in json.dumps(r), r
    assert post(server, files, "w1 w2", max_tokens=2)["token_ids"]  # and the server still answers
