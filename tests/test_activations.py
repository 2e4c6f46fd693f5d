"""Forward passes: pooling under either padding, dedup, early stop, content tokens only."""

import pytest
import torch

from helpers import tiny
from amygdala import AmygdalaError
from amygdala.activations import Pooling, collect, encode

TEXTS = ["w1 w2 w3 al1", "w5 al2", "w7 w8 w9 w10 w11 w12 be3", "w1 w2 w3 al1", "ga1 w4 w6"]


def reference(model, tok, text, layer, pooling="last"):
    """Unbatched full forward: hidden_states[layer + 1], averaged by hand over the pooled tokens."""
    e = encode(tok, text)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([e.ids]), output_hidden_states=True)
    h = out.hidden_states[layer + 1][0]
    if pooling == "last":
        return h[e.read_index]
    first = 1 if e.start == 0 else e.start  # never the attention sink at position 0
    if pooling == "mean_from=2":
        first = first + 2 if e.end - (first + 2) >= 1 else e.end - max(1, (e.end - e.start) // 2)
    return h[first : e.end].mean(0)


@pytest.mark.parametrize("pooling", ["last", "mean", "mean_from=2"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma3_text"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_pooling_equals_unbatched_forward(arch, side, pooling):
    model, tok = tiny.make_model(arch)
    # Layers below the last: transformers applies the final norm to hidden_states[-1].
    acts = collect(model, tok, TEXTS, [1, 2], batch_size=3, padding_side=side, pooling=pooling, progress=False)
    assert str(acts.pooling) == pooling
    for layer in (1, 2):
        for text in set(TEXTS):
            got = acts.pooled[layer][acts.row[text]]
            torch.testing.assert_close(got, reference(model, tok, text, layer, pooling), atol=1e-5, rtol=1e-4)


def test_pooling_spans():
    """[a, b) of content tokens [start, end): mean skips the sink; mean_from=K skips K more, and
    a text too short for that falls back to its last half."""
    assert Pooling.parse("last").span(1, 9) == (8, 9)
    assert Pooling.parse("mean").span(1, 9) == (1, 9)
    assert Pooling.parse("mean").span(0, 9) == (1, 9)  # GPT-2: no BOS, position 0 is content but the sink
    assert Pooling.parse("mean").span(0, 1) == (0, 1)  # a one-token text has nothing else
    assert Pooling.parse("mean_from=3").span(1, 9) == (4, 9)
    assert Pooling.parse("mean_from=50").span(1, 9) == (5, 9)  # 8 tokens < 50: the last half
    assert Pooling.parse("mean_from=50").span(1, 2) == (1, 2)
    assert str(Pooling.parse("mean_from = 7")) == "mean_from=7"
    assert Pooling.parse("last_content_token") == Pooling("last")  # what older readout files say
    for bad in ("first", "mean_from=", "mean_from=-1", "max"):
        with pytest.raises(AmygdalaError, match=r"^pooling .*: use one of last, mean, mean_from=K"):
            Pooling.parse(bad)


def test_one_forward_per_unique_text():
    model, tok = tiny.make_model("llama")
    calls = []
    model.model.register_forward_pre_hook(lambda *a, **k: calls.append(1))
    acts = collect(model, tok, TEXTS, [2], batch_size=1, progress=False)
    assert len(acts.texts) == 4 and len(calls) == 4 == acts.forwards


def test_forward_stops_after_deepest_hooked_layer():
    model, tok = tiny.make_model("llama")
    ran = []
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda *a, i=i: ran.append(i))
    head_calls = []
    model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    collect(model, tok, ["w1 w2"], [1], progress=False)
    assert ran == [0, 1] and head_calls == []


def test_pooling_reads_last_content_token_not_special():
    _, tok = tiny.make_model("llama")
    e = encode(tok, "w1 w2 al1")
    assert tok.convert_ids_to_tokens(e.ids)[0] == "<s>"  # BOS is not content
    assert (e.start, e.end) == (1, 4)
    assert tok.convert_ids_to_tokens([e.ids[e.read_index]]) == ["al1"]


def test_chat_template_reads_last_content_token_not_end_of_turn():
    _, tok = tiny.make_model("llama")
    e = encode(tok, "w1 w2 al1", chat_template=True)
    tokens = tok.convert_ids_to_tokens(e.ids)
    assert tokens[e.read_index] == "al1"
    assert "<|im_end|>" in tokens[e.read_index + 1 :]


def test_token_callback_gets_content_tokens():
    model, tok = tiny.make_model("llama")
    seen = {}
    collect(model, tok, ["w1 w2 al1", "w3"], [0, 2], on_tokens=lambda r, l, m, s: seen.__setitem__((r, l), (m.shape, s)), progress=False)
    assert seen[(0, 0)] == (torch.Size([3, 64]), 1)
    assert seen[(1, 2)] == (torch.Size([1, 64]), 1)
