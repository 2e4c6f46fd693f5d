"""Forward passes: pooling under either padding, dedup, early stop, last content token."""

import pytest
import torch

import tiny
from amygdala.activations import collect, encode

TEXTS = ["w1 w2 w3 al1", "w5 al2", "w7 w8 w9 w10 w11 w12 be3", "w1 w2 w3 al1", "ga1 w4 w6"]


def reference(model, tok, text, layer):
    """Unbatched full forward: hidden_states[layer + 1] at the last content token."""
    e = encode(tok, text)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([e.ids]), output_hidden_states=True)
    return out.hidden_states[layer + 1][0, e.read_index]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma3_text"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_pooling_equals_unbatched_forward(arch, side):
    model, tok = tiny.make_model(arch)
    # Layers below the last: transformers applies the final norm to hidden_states[-1].
    acts = collect(model, tok, TEXTS, [1, 2], batch_size=3, padding_side=side, progress=False)
    for layer in (1, 2):
        for text in set(TEXTS):
            got = acts.pooled[layer][acts.row[text]]
            torch.testing.assert_close(got, reference(model, tok, text, layer), atol=1e-5, rtol=1e-4)


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
