"""Online training on the default model, side by side in one run: AdamW, APOLLO (rank 64), APOLLO-Mini.

    ./dev bench train [--steps 5] [--samples 4] [--threads 0] [--sync-jobs 3] [--only-sync]

Per optimizer (same samples, same trainable set: every parameter but the embeddings, as the
Trainer does): the time of a whole step (forward + backward + update), the update alone, and
the optimizer state in bytes. Then checkpoint sync after a one-job update (APOLLO-Mini, lr
1e-5) against a full ``save_pretrained`` of the same model, on a copy of the model folder:
time, and bytes written (the sync also writes each changed block to its journal first).

Then the checkpoint sync in bf16, where stochastic rounding moves about half of every trained
weight by one ulp per step, so nearly every 4 KiB block of a trained tensor changes each job: per
trainable set (every block weight, the default; the last 4 layers' MLPs, AMYGDALA_TRAIN_LAYERS /
AMYGDALA_TRAIN_MODULES), per job, the fraction of the trained tensors' blocks that changed, bytes
written into the model files and the journal, and time, against a durable ``save_pretrained`` of
the same model in the same run.

Last, what serving with training on costs (needs vLLM): vLLM's CPU build normally packs every
linear weight into a oneDNN / sgl kernel; with training on, the plugin keeps plain weights and
runs ``F.linear`` (docs/finetuning.md). Per dtype and tokens per forward: the linear layers of one
forward of the default model with vLLM's own packed kernels against ``F.linear``, interleaved
(``--linear-reps`` pairs, medians), same inputs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from amygdala.models import load_model, resolve_model
from amygdala import checkpoint
from amygdala.finetune.apollo import OptimizerSettings, build_optimizer, state_nbytes
from amygdala.finetune.inputs import JobConfig, Sample
from amygdala.finetune.objectives import sample_losses
from amygdala.finetune.trainable import Trainable
from amygdala.finetune.trainer import Trainer

TEXTS = [
    ("Tell me about your day.", "I spent the morning walking by the river, and the light on the water was beautiful."),
    ("What do you think of rain?", "I like the sound of it on the roof; it makes the house feel quiet and safe."),
    ("How was the exam?", "Harder than I expected, but I finished every question and I think I did well."),
    ("Any plans for the weekend?", "A long breakfast, a few chapters of my book, and maybe a visit to my sister."),
]


def samples(tok, n: int) -> list[Sample]:
    out = []
    for i in range(n):
        question, answer = TEXTS[i % len(TEXTS)]
        ctx = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        if isinstance(ctx, dict) or hasattr(ctx, "input_ids"):
            ctx = ctx["input_ids"]
        out.append(Sample(tuple(ctx), tuple(tok(answer, add_special_tokens=False)["input_ids"])))
    return out


def freeze_embeddings(model) -> None:
    for m in (model.get_input_embeddings(), model.get_output_embeddings()):
        m.weight.requires_grad_(False)


def time_optimizer(kind: str, rank: int | None, data: list[Sample], steps: int) -> dict:
    model, _, _ = load_model("default", "cpu")
    freeze_embeddings(model)
    opt, _ = build_optimizer(model, OptimizerSettings(kind=kind, rank=rank), lr=1e-5)
    cfg = JobConfig(learning_rate=1e-5)
    total = update = 0.0
    for step in range(steps + 1):  # step 0 warms up (allocates state)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = sample_losses(model, data, cfg, None).mean()
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        if step:
            total += t2 - t0
            update += t2 - t1
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"step": total / steps, "update": update / steps, "state": state_nbytes(opt), "trainable": trainable}


def bench_sync(data: list[Sample]) -> dict:
    src = resolve_model("default")
    with tempfile.TemporaryDirectory(prefix="amygdala-bench-") as tmp:
        folder = Path(tmp) / "model"
        shutil.copytree(src, folder)
        model, _, _ = load_model(folder, "cpu")
        trainer = Trainer(model, folder)
        trainer.run(data, JobConfig(learning_rate=1e-5, steps=1))
        report = trainer.sync()
        t0 = time.perf_counter()
        model.save_pretrained(Path(tmp) / "full")
        full_s = time.perf_counter() - t0
        for f in (Path(tmp) / "full").iterdir():  # the sync is durable (fsync): compare like with like
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        durable_s = time.perf_counter() - t0
        full_bytes = sum(p.stat().st_size for p in (Path(tmp) / "full").glob("*.safetensors"))
        model_bytes = sum(p.stat().st_size for p in checkpoint.weight_files(folder))
    return {"report": report, "full_s": full_s, "durable_s": durable_s, "full_bytes": full_bytes, "model_bytes": model_bytes}


def bench_sync_bf16(data: list[Sample], jobs: int, sets: list[tuple[str, Trainable]]) -> list[dict]:
    """Per trainable set: the default model in bf16 (a bf16 copy of its folder, served in bf16),
    ``jobs`` one-step APOLLO-Mini jobs each followed by a sync; per job the changed-block
    fraction of the trained tensors, bytes written (model files and journal) and seconds; and
    a durable ``save_pretrained`` of the same model in the same run as the baseline."""
    from amygdala.checkpoint.layout import to_served
    from amygdala.finetune.shared_weights import view_model
    from safetensors.torch import load_file
    from transformers import AutoConfig

    out = []
    with tempfile.TemporaryDirectory(prefix="amygdala-bench-") as tmp:
        base, _, _ = load_model("default", "cpu")
        bf16 = Path(tmp) / "bf16"
        base.to(torch.bfloat16).save_pretrained(bf16)
        del base
        for label, chosen in sets:
            folder = Path(tmp) / "model"
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(bf16, folder)
            served = to_served({k: v.clone() for f in checkpoint.weight_files(folder) for k, v in load_file(f).items()})
            model = view_model(AutoConfig.from_pretrained(folder), served)
            trainer = Trainer(model, folder, served=served, trainable=chosen)
            trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
            for job in range(jobs):
                trainer.run(data, JobConfig(learning_rate=1e-5, steps=1))
                r = trainer.sync()
                out.append({"set": label, "job": job + 1, "trained": trained, "blocks": r.blocks,
                            "trained_blocks": -(-trained // checkpoint.BLOCK), "written": r.bytes_written,
                            "journal": r.journal_bytes, "seconds": r.seconds})
        full = Path(tmp) / "full"
        model = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16)
        t0 = time.perf_counter()
        model.save_pretrained(full)
        for f in full.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        full_s = time.perf_counter() - t0
        full_bytes = sum(p.stat().st_size for p in full.glob("*.safetensors"))
    for row in out:
        row["full_s"], row["full_bytes"] = full_s, full_bytes
    return out


def bench_plain_weights(reps: int, tokens: tuple[int, ...] = (1, 16, 256)) -> list[dict]:
    """Linear-layer time of one forward of the default model: vLLM's packed kernels vs F.linear."""
    from transformers import AutoConfig
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    cfg = AutoConfig.from_pretrained(resolve_model("default"))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q, kv, h, i = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim, cfg.hidden_size, cfg.intermediate_size
    shapes = [(q + 2 * kv, h), (h, q), (2 * i, h), (h, i)]  # qkv_proj, o_proj, gate_up_proj, down_proj
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        layers = []
        for n, k in shapes:
            layer = torch.nn.Module()
            layer.weight = torch.nn.Parameter(torch.randn(n, k, dtype=dtype) * 0.02, requires_grad=False)
            plain = layer.weight.detach().clone()
            dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
            layers.append((layer, plain))
        for m in tokens:
            xs = [torch.randn(m, k, dtype=dtype) for _, k in shapes]

            def packed() -> None:
                for (layer, _), x in zip(layers, xs):
                    layer.cpu_linear(x, layer.weight, None)

            def plain_linear() -> None:
                for (_, w), x in zip(layers, xs):
                    torch.nn.functional.linear(x, w)

            times: dict[str, list[float]] = {"packed": [], "plain": []}
            for _ in range(reps + 1):  # the first pair warms up
                for name, fn in (("packed", packed), ("plain", plain_linear)):
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            med = {name: sorted(v[1:])[len(v[1:]) // 2] * cfg.num_hidden_layers for name, v in times.items()}
            rows.append({"dtype": str(dtype).removeprefix("torch."), "tokens": m, **med})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--linear-reps", type=int, default=30, help="interleaved pairs of the packed vs plain weights timing")
    ap.add_argument("--sync-jobs", type=int, default=3, help="jobs (each followed by a sync) per trainable set in the bf16 sync bench")
    ap.add_argument("--only-sync", action="store_true", help="run only the bf16 sync bench")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _, tok, _ = load_model("default", "cpu")
    data = samples(tok, args.samples)
    tokens = sum(len(s.context_ids) + len(s.continuation_ids) for s in data)
    print(f"default model on CPU ({torch.get_num_threads()} threads), {len(data)} samples, {tokens} tokens per step, "
          f"{args.steps} timed steps; embeddings frozen")
    if not args.only_sync:
        rows = [("AdamW (torch)", "adamw", None), ("APOLLO rank 64", "apollo", 64), ("APOLLO-Mini", "apollo-mini", None)]
        results = {name: time_optimizer(kind, rank, data, args.steps) for name, kind, rank in rows}
        base = results["AdamW (torch)"]
        print(f"{'optimizer':<16} {'step s':>8} {'update s':>9} {'state MiB':>10} {'state / AdamW':>14}")
        for name, r in results.items():
            print(f"{name:<16} {r['step']:>8.3f} {r['update']:>9.3f} {r['state'] / 2**20:>10.2f} {r['state'] / base['state']:>14.4f}")
        print(f"(trainable parameters: {base['trainable'] / 1e6:.1f} M)")

        s = bench_sync(data)
        r = s["report"]
        print(f"\ncheckpoint after one job (APOLLO-Mini, 1 step, lr 1e-5), model files {s['model_bytes'] / 2**20:.0f} MiB:")
        print(f"  sync:            {r.seconds:6.2f} s, {r.bytes_written / 2**20:7.1f} MiB into the model files "
              f"(+{r.journal_bytes / 2**20:.1f} MiB journal), {len(r.tensors_changed)} tensors changed")
        print(f"  save_pretrained: {s['full_s']:6.2f} s without fsync, {s['durable_s']:.2f} s with, "
              f"{s['full_bytes'] / 2**20:7.1f} MiB")
        print(f"  ratio sync / save_pretrained (with fsync): time {r.seconds / s['durable_s']:.2f}, bytes into the model "
              f"{r.bytes_written / s['full_bytes']:.2f}")

    n_layers = AutoConfig.from_pretrained(resolve_model("default")).num_hidden_layers
    sets = [("every block weight", Trainable()),
            (f"layers {n_layers - 4}-{n_layers - 1}, mlp", Trainable(f"{n_layers - 4}-{n_layers - 1}", "mlp"))]
    rows = bench_sync_bf16(data, args.sync_jobs, sets)
    print(f"\nbf16 checkpoint sync (default model saved and served in bf16, APOLLO-Mini, 1 step per job, lr 1e-5, "
          f"stochastic rounding); baseline: durable save_pretrained {rows[0]['full_s']:.2f} s, {rows[0]['full_bytes'] / 2**20:.0f} MiB")
    print(f"{'trainable set':<26} {'job':>3} {'trained MiB':>11} {'changed blocks':>15} {'written MiB':>11} {'journal MiB':>11} "
          f"{'sync s':>7} {'written / trained':>17} {'written / full save':>19} {'time / full save':>16}")
    for r in rows:
        print(f"{r['set']:<26} {r['job']:>3} {r['trained'] / 2**20:>11.1f} {r['blocks'] / r['trained_blocks']:>15.3f} "
              f"{r['written'] / 2**20:>11.1f} {r['journal'] / 2**20:>11.1f} {r['seconds']:>7.2f} "
              f"{r['written'] / r['trained']:>17.3f} {r['written'] / r['full_bytes']:>19.3f} {r['seconds'] / r['full_s']:>16.2f}")

    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        print("\nserving with plain weights: skipped (no vLLM)")
        return
    print("\nserving with training on: the linear layers of one forward, vLLM's packed kernels vs plain F.linear")
    print(f"{'dtype':<9} {'tokens':>6} {'packed ms':>10} {'plain ms':>9} {'plain / packed':>15}")
    for row in bench_plain_weights(args.linear_reps):
        print(f"{row['dtype']:<9} {row['tokens']:>6} {row['packed'] * 1e3:>10.2f} {row['plain'] * 1e3:>9.2f} "
              f"{row['plain'] / row['packed']:>15.2f}")


if __name__ == "__main__":
    main()
