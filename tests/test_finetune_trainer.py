"""The Trainer end to end on a tiny model: train on served views, sync, restart from the folder
with the same completion and the optimizer state (and step count) continuing."""

from __future__ import annotations

import torch
import pytest
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import tiny
from amygdala import checkpoint
from amygdala.checkpoint import layout
from amygdala.finetune import shared_weights
from amygdala.finetune.apollo import OptimizerSettings
from amygdala.fields import FieldError
from amygdala.finetune.state import STATE_FILE, StateError
from amygdala.finetune.trainer import Trainer

CONTEXT, CONTINUATION = [2, 10, 11, 12, 13], [40, 41, 42, 43, 44, 45]
REQUEST = {"samples": [{"context_ids": CONTEXT, "continuation_ids": CONTINUATION}],
           "config": {"objective": "sft", "learning_rate": 1e-2, "steps": 15}}


pytestmark = pytest.mark.usefixtures("one_thread")


def _greedy(model, n=6):
    ids = torch.tensor([CONTEXT])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(CONTEXT):].tolist()


def _serve(folder):
    """What the vLLM side would hand over: merged tensors, and a trainer model on views of them."""
    config = AutoConfig.from_pretrained(folder)
    served = layout.to_served({k: v.clone() for k, v in load_file(folder / "model.safetensors").items()})
    return served, shared_weights.view_model(config, served)


def test_train_sync_restart_continues(tmp_path):
    folder = tmp_path / "model"
    tiny.make_model("llama", folder)
    served, model = _serve(folder)
    trainer = Trainer(model, folder, served=served)
    assert not model.get_input_embeddings().weight.requires_grad  # frozen by default
    samples, config = trainer.parse(REQUEST)
    losses = []
    trainer.run(samples, config, on_step=lambda step, loss: losses.append(loss))
    trainer.run(samples, config)
    assert len(losses) == 15 and losses[-1] < losses[0]
    assert _greedy(model) == CONTINUATION  # served weights changed in place: no reload
    report = trainer.sync()
    assert report.tensors_changed and STATE_FILE in report.sidecars
    status = trainer.status()
    assert status["steps"] == 30 and status["jobs"] == 2 and status["last_sync"]["bytes_written"] == report.bytes_written
    assert status["optimizer"]["kind"] == "apollo-mini" and status["optimizer"]["rank"] == 1

    # restart: a fresh process would load the folder; the state comes back and the steps continue
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert _greedy(reloaded) == CONTINUATION
    served2, model2 = _serve(folder)
    trainer2 = Trainer(model2, folder, served=served2)
    assert trainer2.counters == {"steps": 30, "jobs": 2}
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), model2.named_parameters()):
        s1, s2 = trainer.optimizer.state.get(p1, {}), trainer2.optimizer.state.get(p2, {})
        assert s1.keys() == s2.keys(), n1
        for key in s1:
            assert torch.equal(torch.as_tensor(s1[key]), torch.as_tensor(s2[key])), (n1, key)
    trainer2.run(samples, config)
    assert trainer2.status()["steps"] == 45
    p = next(p for n, p in model2.named_parameters() if n.endswith("q_proj.weight"))
    assert trainer2.optimizer.state[p]["step"] == 45


def test_state_from_other_settings_is_refused(tmp_path):
    folder = tmp_path / "model"
    model, _ = tiny.make_model("llama", folder)
    trainer = Trainer(model, folder)
    trainer.run(*trainer.parse(REQUEST))
    trainer.sync()
    with pytest.raises(StateError, match=r"amygdala-optimizer.pt: saved for optimizer settings .*kind='apollo-mini'"):
        Trainer(AutoModelForCausalLM.from_pretrained(folder), folder, settings=OptimizerSettings(kind="apollo", rank=8))
    with pytest.raises(StateError, match=r"saved for other trainable parameters"):
        Trainer(AutoModelForCausalLM.from_pretrained(folder), folder, train_embeddings=True)
    (folder / STATE_FILE).write_bytes(b"not a torch file")
    with pytest.raises(StateError, match="not a readable optimizer state"):
        Trainer(AutoModelForCausalLM.from_pretrained(folder), folder)


def test_trainer_checks_requests_against_its_model(tmp_path):
    folder = tmp_path / "model"
    model, tok = tiny.make_model("llama", folder)
    trainer = Trainer(model, folder)
    bad = {**REQUEST, "samples": [{"context_ids": CONTEXT, "continuation_ids": [len(tok)]}]}
    with pytest.raises(FieldError) as err:
        trainer.parse(bad)
    assert err.value.path == "samples[0].continuation_ids[0]"
    assert checkpoint.diagnose(folder).clean


@pytest.mark.slow
def test_default_model_trains_on_served_views_and_syncs(tmp_path):
    """SmolLM2 (GQA, tied embeddings) in vLLM's layout: a short SFT job in place, then a sync
    whose folder reloads to the trained weights."""
    import shutil

    from amygdala.models import load_model, resolve_model
    from amygdala.finetune.inputs import JobConfig, Sample
    from amygdala.finetune.objectives import continuation_logprobs

    folder = tmp_path / "model"
    shutil.copytree(resolve_model("default"), folder)
    _, tok, _ = load_model(folder, "cpu")
    served, model = _serve(folder)
    assert "model.layers.0.self_attn.qkv_proj.weight" in served and "lm_head.weight" not in served
    trainer = Trainer(model, folder, served=served)
    context = tuple(tok("The capital of the small island is")["input_ids"])
    continuation = tuple(tok(" Amygdalopolis, a harbour town.", add_special_tokens=False)["input_ids"])
    sample = Sample(context, continuation)

    def logprob(m):
        with torch.no_grad():
            return continuation_logprobs(m, [context], [continuation]).total.item()

    before = logprob(model)
    result = trainer.run([sample], JobConfig(learning_rate=1e-4, steps=4))
    assert result.losses[-1] < result.losses[0]
    after = logprob(model)
    assert after > before + 5
    report = trainer.sync()
    assert len(report.tensors_changed) > 200 and "model.embed_tokens.weight" not in report.tensors_changed
    reloaded, _, _ = load_model(folder, "cpu")
    assert logprob(reloaded) == pytest.approx(after, abs=1e-3)
