"""Layer discovery across architectures and --layers parsing."""

import pytest
from torch import nn

from helpers import tiny
from amygdala import AmygdalaError
from amygdala.models import find_layers, parse_layers, relative_depth
from amygdala.models.resolve import model_info, resolve_model


@pytest.mark.parametrize("arch", list(tiny.ARCHS))
def test_find_layers_every_architecture(arch):
    model, _ = tiny.make_model(arch, layers=3)
    layers = find_layers(model)
    assert len(layers) == 3
    assert all(type(l) is type(layers[0]) for l in layers)


def test_find_layers_nested_language_model_wrapper():
    inner, _ = tiny.make_model("llama", layers=2)

    class Wrapper(nn.Module):  # the layout of multimodal models: model.language_model.layers
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.language_model = inner.model

    assert find_layers(Wrapper()) is inner.model.layers


def test_find_layers_unknown_model_names_its_class():
    class Odd(nn.Module):
        pass

    with pytest.raises(AmygdalaError, match="Odd"):
        find_layers(Odd())


def test_parse_layers_indices_relative_and_negative():
    assert parse_layers("10,15,20", 30) == [10, 15, 20]
    assert parse_layers("0.5,0.66", 30) == [14, 19]
    assert parse_layers("-1,0", 30) == [0, 29]
    assert parse_layers("5,5", 30) == [5]
    assert relative_depth(29, 30) == 1.0


@pytest.mark.parametrize("spec", ["30", "-31", "1.5", "abc", ""])
def test_parse_layers_rejects_with_valid_range(spec):
    with pytest.raises(AmygdalaError, match="^layers: "):
        parse_layers(spec, 30)
    if spec == "30":
        with pytest.raises(AmygdalaError, match="0-29"):
            parse_layers(spec, 30)


def test_model_info_reads_config_without_weights(tiny_llama_dir):
    info = model_info(resolve_model(tiny_llama_dir))
    assert (info.num_layers, info.hidden_size, info.model_type) == (4, 64, "llama")


def test_resolve_model_rejects_non_model_folder(tmp_path):
    with pytest.raises(AmygdalaError, match="config.json"):
        resolve_model(tmp_path)
