"""A chosen trainable set (AMYGDALA_TRAIN_LAYERS / AMYGDALA_TRAIN_MODULES): what it freezes, that
a bf16 sync then writes only what the set holds, and that the folder's optimizer state is tied to it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from helpers import tiny
from amygdala.checkpoint import layout
from amygdala.finetune import shared_weights
from amygdala.finetune.state import StateError
from amygdala.finetune.trainable import Trainable, TrainableError
from amygdala.finetune.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

REQUEST = {"samples": [{"context_ids": [2, 10, 11, 12, 13], "continuation_ids": [40, 41, 42, 43]}],
           "config": {"objective": "sft", "learning_rate": 1e-5, "steps": 1}}


def test_layer_lists_and_ranges_and_their_errors():
    assert Trainable("2-3").layer_indices(6) == [2, 3]
    assert Trainable("0, -2--1").layer_indices(6) == [0, 4, 5]
    assert Trainable("").layer_indices(3) == [0, 1, 2]
    with pytest.raises(TrainableError, match="outside the model's 6 layers"):
        Trainable("4-6").layer_indices(6)
    with pytest.raises(TrainableError, match="runs backwards"):
        Trainable("3-1").layer_indices(6)
    with pytest.raises(TrainableError, match="'x' is not a layer index"):
        Trainable("x").layer_indices(6)


def test_apply_freezes_everything_outside_the_set():
    model, _ = tiny.make_model("llama", layers=4)
    Trainable("-1", "mlp,self_attn.o_proj").apply(model)
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trained == ["model.layers.3.mlp.down_proj.weight", "model.layers.3.mlp.gate_proj.weight",
                       "model.layers.3.mlp.up_proj.weight", "model.layers.3.self_attn.o_proj.weight"]
    with pytest.raises(TrainableError, match="selects no parameter; a block holds"):
        Trainable("", "attention").apply(tiny.make_model("llama", layers=2)[0])


def _bf16_trainer(tmp_path, name: str, trainable: Trainable) -> Trainer:
    folder = tmp_path / name
    model, tok = tiny.make_model("llama", layers=4, hidden=128)
    model.to(torch.bfloat16).save_pretrained(folder)
    served = layout.to_served({k: v.clone() for k, v in load_file(folder / "model.safetensors").items()})
    return Trainer(shared_weights.view_model(AutoConfig.from_pretrained(folder), served), folder, served=served, trainable=trainable)


def test_a_bf16_sync_writes_what_the_set_holds_and_no_more(tmp_path):
    """Stochastic rounding changes nearly every block of every trained bf16 tensor, so a whole
    model's job rewrites most of the blocks; training one layer's MLP rewrites about that MLP."""
    everything = _bf16_trainer(tmp_path, "all", Trainable())
    one_mlp = _bf16_trainer(tmp_path, "mlp", Trainable("3", "mlp"))
    reports = {}
    for name, trainer in (("all", everything), ("mlp", one_mlp)):
        trainer.run(*trainer.parse(REQUEST))
        reports[name] = trainer.sync()
    assert all(n.startswith("model.layers.3.mlp.") for n in reports["mlp"].tensors_changed)
    mlp_bytes = sum(p.numel() * 2 for n, p in one_mlp.model.named_parameters() if p.requires_grad)
    block_bytes = sum(p.numel() * 2 for n, p in everything.model.named_parameters() if p.requires_grad)
    assert mlp_bytes <= reports["mlp"].bytes_written <= mlp_bytes + 3 * 4096  # edge blocks shared with neighbours
    assert reports["all"].bytes_written >= 0.9 * block_bytes  # nearly every block of every trained tensor
    assert one_mlp.status()["trainable"] == {"layers": "3", "modules": "mlp"}
    assert everything.status()["trainable"] == {"layers": "all", "modules": "all"}


def test_the_folders_optimizer_state_belongs_to_its_set(tmp_path):
    trainer = _bf16_trainer(tmp_path, "m", Trainable("3", "mlp"))
    trainer.run(*trainer.parse(REQUEST))
    trainer.sync()
    folder = trainer.model_dir
    served = layout.to_served({k: v.clone() for k, v in load_file(folder / "model.safetensors").items()})
    model = shared_weights.view_model(AutoConfig.from_pretrained(folder), served)
    with pytest.raises(StateError, match="saved for other trainable parameters"):
        Trainer(model, folder, served=served, trainable=Trainable("2-3", "mlp"))
    Trainer(model, folder, served=served, trainable=Trainable("3", "mlp"))  # the same set restores
