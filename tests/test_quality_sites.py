"""What the quality report reads, captured in the build's forward: the attention output and MLP
down projections' inputs equal an unbatched forward's, found and oriented in every architecture.
Split from tests/test_quality.py."""

import pytest
import torch

from helpers import tiny
from amygdala.activations import collect, encode
from amygdala.models.layers import (
    attention_out_proj,
    find_layers,
    mlp_down_proj,
    projection_sites,
    projection_weight,
)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_site_inputs_equal_an_unbatched_forward(arch, side):
    model, tok = tiny.make_model(arch)
    texts = ["w1 w2 w3 al1", "w5 al2", "w7 w8 w9 w10 w11 w12 be3"]
    sites = projection_sites(model, [1, 2])
    acts = collect(model, tok, texts, [1, 2], batch_size=2, padding_side=side, pooling="last", progress=False, sites=sites)
    for name, module in sites.items():
        for text in texts:
            seen = []
            handle = module.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0]))
            e = encode(tok, text)
            with torch.no_grad():
                model(input_ids=torch.tensor([e.ids]))
            handle.remove()
            torch.testing.assert_close(acts.sites[name][acts.row[text]], seen[0][0, e.read_index], atol=1e-5, rtol=1e-4)


def test_site_past_the_deepest_layer_is_an_error():
    model, tok = tiny.make_model("llama")
    with pytest.raises(ValueError, match="mlp.3 never ran before the forward stopped after layer 1"):
        collect(model, tok, ["w1 al1"], [1], progress=False, sites={"mlp.3": mlp_down_proj(find_layers(model)[3])})


@pytest.mark.parametrize("arch", list(tiny.ARCHS))
def test_projections_are_found_and_oriented_in_every_architecture(arch):
    model, _ = tiny.make_model(arch)
    block = find_layers(model)[1]
    attn, down = attention_out_proj(block), mlp_down_proj(block)
    x = torch.randn(3, 128 if arch != "gpt2" else 256)
    w = projection_weight(down)
    assert w.shape == (64, x.shape[1])  # [hidden, neurons]
    bias = getattr(down, "bias", None)
    torch.testing.assert_close(down(x), x @ w.T + (bias if bias is not None else 0), atol=1e-5, rtol=1e-4)
    assert projection_weight(attn).shape == (64, 64)
