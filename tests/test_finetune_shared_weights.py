"""A transformers model on views of served (vLLM-layout) tensors: same outputs, no copies,
in-place training reaches the holder, also from another process through shared memory."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny
from amygdala.checkpoint import layout
from amygdala.finetune import shared_weights
from amygdala.finetune.apollo import OptimizerSettings, build_optimizer
from amygdala.finetune.inputs import JobConfig, Sample
from amygdala.checkpoint.layout import LayoutError
from amygdala.finetune.trainer import run_job



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", False), ("llama", True)])
def test_view_model_matches_and_aliases_the_served_tensors(arch, tied):
    model, tok = tiny.make_model(arch)
    if tied:
        from transformers import AutoModelForCausalLM

        config = tiny.make_config(arch, len(tok))
        config.tie_word_embeddings = True
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        assert model.lm_head.weight is model.model.embed_tokens.weight
    served = layout.to_served(model.state_dict())
    assert any(n.endswith("qkv_proj.weight") for n in served) and any(n.endswith("gate_up_proj.weight") for n in served)
    if arch == "qwen2":
        assert "model.layers.0.self_attn.qkv_proj.bias" in served
    vm = shared_weights.view_model(model.config, served)
    ids = torch.tensor([[2, 10, 11, 12, 13, 14]])
    with torch.no_grad():
        torch.testing.assert_close(vm(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    storages = {t.untyped_storage().data_ptr() for t in served.values()}
    assert all(p.untyped_storage().data_ptr() in storages for p in vm.parameters())
    if tied:
        assert vm.get_output_embeddings().weight is vm.get_input_embeddings().weight

    # the second half of qkv is k and v: an optimizer step on v_proj lands in qkv_proj's rows
    qkv = served["model.layers.1.self_attn.qkv_proj.weight"]
    before = qkv.clone()
    opt, _ = build_optimizer(vm, OptimizerSettings(kind="apollo-mini"))
    run_job(vm, opt, [Sample((2, 10, 11), (12, 13))], JobConfig(learning_rate=1e-2, steps=1))
    head_dim = vm.config.hidden_size // vm.config.num_attention_heads
    q, k = vm.config.num_attention_heads * head_dim, vm.config.num_key_value_heads * head_dim
    v_now = dict(vm.named_parameters())["model.layers.1.self_attn.v_proj.weight"]
    assert not torch.equal(qkv[q + k:], before[q + k:])
    assert torch.equal(qkv[q + k:], v_now.detach())


def test_missing_or_misshapen_served_tensors_are_named():
    model, _ = tiny.make_model("llama")
    served = layout.to_served(model.state_dict())
    del served["model.layers.2.mlp.gate_up_proj.weight"]
    with pytest.raises(LayoutError, match=r"model.layers.2.mlp.gate_proj.weight: no served tensor model.layers.2.mlp.gate_up_proj.weight"):
        shared_weights.view_model(model.config, served)
    served = layout.to_served(model.state_dict())
    served["model.layers.0.self_attn.qkv_proj.weight"] = served["model.layers.0.self_attn.qkv_proj.weight"][:100]
    with pytest.raises(LayoutError, match=r"k_proj.weight: served .*qkv_proj.weight has shape \(100, 64\), cannot hold rows \[64, 128\)"):
        shared_weights.view_model(model.config, served)


def test_padded_vocabulary_rows_are_cut_as_a_view():
    """vLLM pads the embedding to a multiple of 64 rows: the model sees the first vocab_size rows."""
    model, _ = tiny.make_model("llama")
    served = layout.to_served(model.state_dict())
    emb = served["model.embed_tokens.weight"]
    padded = torch.cat([emb, torch.zeros(64 - emb.shape[0] % 64, emb.shape[1])])
    served["model.embed_tokens.weight"] = padded
    vm = shared_weights.view_model(model.config, served)
    assert vm.get_input_embeddings().weight.data_ptr() == padded.data_ptr()
    assert vm.get_input_embeddings().weight.shape[0] == model.config.vocab_size


def test_export_needs_shared_memory():
    with pytest.raises(LayoutError, match=r"x: a CPU tensor must be in shared memory"):
        shared_weights.export_handles({"x": torch.zeros(3)})


def test_another_process_trains_on_shared_memory_views():
    """bench/gpu_shared_weights.py's experiment on CPU: a child steps APOLLO-Mini on views; this process sees the change."""
    import torch.multiprocessing as tmp

    from helpers.shared_weights import run

    strategy = tmp.get_sharing_strategy()
    try:
        summary = run("cpu", "tiny", ["apollo-mini"], steps=2, lr=1e-4, threads=1)
    finally:
        tmp.set_sharing_strategy(strategy)
    (r,) = summary["results"]
    assert summary["ok"] and r["aliased"] and r["parent_no_copy"] and r["parent_matches_child"]
    assert r["parent_logits_moved"] > 0 and r["loss_last"] < r["loss_first"]
