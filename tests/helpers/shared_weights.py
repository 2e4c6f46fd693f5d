"""The two-process shared-weights experiment that bench/gpu_shared_weights.py reports and
tests/test_finetune_shared_weights.py checks on CPU: one importable place both use, so the test
runs exactly the bench's code without loading a bench file by path.

The parent holds the weights merged the way vLLM serves them and a model on views of them; per
optimizer a child (this file run as a script) receives their handles, checks that every parameter
aliases the parent's memory and steps in place; the parent then checks it sees the result.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the child runs this file from a bare checkout too

import torch  # noqa: E402

from amygdala.checkpoint import layout  # noqa: E402
from amygdala.finetune import shared_weights  # noqa: E402
from amygdala.finetune.apollo import OptimizerSettings, build_optimizer, state_nbytes  # noqa: E402
from amygdala.finetune.inputs import JobConfig, Sample  # noqa: E402
from amygdala.finetune.trainer import run_job  # noqa: E402

#: SmolLM2-135M-Instruct's shape, for machines without the converted model.
SMOLLM2 = dict(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
)
TINY = dict(
    model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
    tie_word_embeddings=False,
)


def build(model: str, device: str, dtype: torch.dtype):
    """(config, checkpoint-named state dict, what the weights are)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model not in ("default", "tiny"):
        m = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
        return m.config, m.state_dict(), model
    source = "random weights, tiny Llama"
    if model == "default":
        try:
            from amygdala.models.resolve import DEFAULT_MODEL_NAME, amygdala_home

            folder = amygdala_home() / "models" / DEFAULT_MODEL_NAME
            if (folder / "config.json").is_file():
                m = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
                return m.config, m.state_dict(), f"{DEFAULT_MODEL_NAME} from {folder}"
        except ImportError:
            pass
        source = "random weights in SmolLM2-135M-Instruct's shape"
    spec = dict(SMOLLM2 if model == "default" else TINY)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return m.config, m.state_dict(), source


def _sample(vocab: int) -> Sample:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (48,), generator=g).tolist()
    return Sample(tuple(ids[:32]), tuple(ids[32:]))


def child() -> None:
    """Read the payload from stdin, train on views of the parent's tensors, print one JSON line."""
    from transformers import AutoConfig

    payload = pickle.loads(sys.stdin.buffer.read())
    served = shared_weights.import_handles(payload["handles"])
    config = AutoConfig.for_model(**payload["config"])
    device = payload["device"]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    model = shared_weights.view_model(config, served)
    storages = {t.untyped_storage().data_ptr() for t in served.values()}
    aliased = all(p.untyped_storage().data_ptr() in storages for p in model.parameters())
    for m in (model.get_input_embeddings(), model.get_output_embeddings()):  # as the Trainer does
        m.weight.requires_grad_(False)
    opt, _ = build_optimizer(model, OptimizerSettings(kind=payload["kind"]))
    sample = _sample(config.vocab_size)
    cfg = JobConfig(learning_rate=payload["lr"], steps=1)
    run_job(model, opt, [sample], cfg)  # warm-up step (allocates state and kernels)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = run_job(model, opt, [sample], JobConfig(learning_rate=payload["lr"], steps=payload["steps"]))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / payload["steps"]
    probe = payload["probe"]
    out = {
        "kind": payload["kind"],
        "aliased": aliased,
        "loss_first": result.losses[0],
        "loss_last": result.losses[-1],
        "step_s": step_s,
        "state_bytes": state_nbytes(opt),
        "probe_sum": float(dict(model.named_parameters())[probe].detach().double().sum()),
    }
    if device.startswith("cuda"):
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    else:
        import resource

        out["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out))


def run(device: str, model: str, optimizers: list[str], steps: int, lr: float, threads: int = 0) -> dict:
    """Hold the weights here, train in a child per optimizer; the summary with every check."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    config, state, source = build(model, device, dtype)
    served = {n: t.to(device) for n, t in layout.to_served(state).items()}
    del state
    if device == "cpu":
        for t in served.values():
            t.share_memory_()
    mine = shared_weights.view_model(config, served, trainable=False)  # the parent's model: also views
    probe = "model.layers.0.self_attn.k_proj.weight"
    probe_served = "model.layers.0.self_attn.qkv_proj.weight"
    prompt = torch.tensor([list(_sample(config.vocab_size).context_ids)], device=device)
    config_dict = config.to_dict()
    handles = shared_weights.export_handles(served)
    results, ok = [], True
    for kind in optimizers:
        before_probe = served[probe_served].clone()
        with torch.no_grad():
            before_logits = mine(prompt).logits.float()
        payload = pickle.dumps({"handles": handles, "config": config_dict, "device": device, "kind": kind,
                                "steps": steps, "lr": lr, "probe": probe})
        cmd = [sys.executable, __file__, "--threads", str(threads)]  # this file's __main__: child()
        proc = subprocess.run(cmd, input=payload, capture_output=True)
        if proc.returncode != 0:
            raise RuntimeError(f"child ({kind}) failed:\n{proc.stderr.decode()[-3000:]}")
        r = json.loads(proc.stdout.decode().strip().splitlines()[-1])
        with torch.no_grad():
            after_logits = mine(prompt).logits.float()
        mine_probe = dict(mine.named_parameters())[probe]
        r["parent_sees_change"] = bool(not torch.equal(before_probe, served[probe_served]))
        r["parent_matches_child"] = float(mine_probe.double().sum()) == r["probe_sum"]
        r["parent_logits_moved"] = float((after_logits - before_logits).abs().max())
        r["parent_no_copy"] = mine_probe.untyped_storage().data_ptr() == served[probe_served].untyped_storage().data_ptr()
        r["ok"] = (r["aliased"] and r["parent_sees_change"] and r["parent_matches_child"] and r["parent_no_copy"]
                   and r["parent_logits_moved"] > 0)
        ok &= r["ok"]
        results.append(r)
    return {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "weights": source,
            "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__, "results": results, "ok": ok}



if __name__ == "__main__":  # the child: python tests/helpers/shared_weights.py --threads N < payload
    if sys.argv[1:2] == ["--threads"] and int(sys.argv[2]):
        torch.set_num_threads(int(sys.argv[2]))
    child()
