"""The memory plan for a 27B hybrid on one 80 GB GPU and on 2-8 GPUs (docs/scale.md).

    ./dev bench memory [--config path/to/config.json] [--train-tokens 4096] [--gpu-gib 80]

Nothing here is measured: the numbers come from :mod:`amygdala.finetune.memory`, whose formulas
``tests/test_memory.py`` checks against torch's own allocations on small models. The default
config is Qwen3.5-27B's text model as published (48 gated-delta-net and 16 attention layers);
give ``--config`` a config.json to plan another model. Per setting: weights, optimizer state,
gradients, activations (checkpointed) per GPU, and the KV cache left at vLLM's default 0.9 GPU
memory utilisation, in tokens of context.
"""

from __future__ import annotations

import argparse
import json

from amygdala.finetune import memory

#: Qwen3.5-27B's text config (its config.json, text_config), the 27B hybrid the original system served.
#: The attention, MLP, layer-count and vocabulary sizes agree with the model arguments of a public
#: training recipe for it (THUDM/slime, scripts/models/qwen3.5-27B.sh); the linear-attention head
#: counts were not checked against a second source: pass --config with the real file to be sure.
QWEN35_27B = dict(
    model_type="qwen3_5_text", hidden_size=5120, intermediate_size=17408, num_hidden_layers=64,
    num_attention_heads=24, num_key_value_heads=4, head_dim=256, vocab_size=248320,
    linear_num_key_heads=16, linear_num_value_heads=48, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_conv_kernel_dim=4, tie_word_embeddings=False,
    layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 16,
)


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="a config.json (default: Qwen3.5-27B's text config)")
    p.add_argument("--gpu-gib", type=float, default=80.0)
    p.add_argument("--train-tokens", type=int, default=4096, help="tokens per training step (all samples of a batch)")
    args = p.parse_args(argv)
    raw = json.load(open(args.config)) if args.config else dict(QWEN35_27B)
    raw = raw.get("text_config", raw)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    s = memory.shapes(config)
    gib = memory.GIB
    print(f"params {s.params / 1e9:.2f} B (trainable without embeddings {s.trainable / 1e9:.2f} B); "
          f"{s.attention_layers} of {s.layers} layers keep a KV cache: {memory.kv_per_token(s, 2) / 1024:.0f} KiB per token in bf16; "
          f"linear-attention state {s.state_bytes_per_seq / 2**20:.1f} MiB per sequence")
    print(f"optimizer state, whole model (bf16 moments): adamw {memory.optimizer_state(s, 'adamw', 2) / gib:.1f} GiB, "
          f"apollo rank 64 {memory.optimizer_state(s, 'apollo', 2, 64) / gib:.2f} GiB, "
          f"apollo-mini {memory.optimizer_state(s, 'apollo-mini', 2) / gib:.3f} GiB; gradients {memory.gradients(s, 2) / gib:.1f} GiB; "
          f"checkpointed activations at {args.train_tokens} tokens "
          f"{memory.checkpointed_activations(s, args.train_tokens, 2) / gib:.1f} GiB + one block recomputed "
          f"{memory.block_recompute(s, args.train_tokens, 2) / gib:.2f} GiB")
    print()
    context = 8192
    print(f"| GPUs (TP) | training | weights | optimizer | gradients | activations | left for KV + state | sequences of {context} tokens |")
    print("|---|---|---|---|---|---|---|---|")
    settings = [(None, 1.0), ("apollo-mini", 1.0), ("apollo-mini", 0.25), ("apollo", 1.0), ("adamw", 1.0)]
    for gpus in (1, 2, 4, 8):
        for opt, fraction in settings:
            pl = memory.plan(s, gpus=gpus, gpu_bytes=args.gpu_gib * gib, optimizer=opt, train_tokens=args.train_tokens,
                             train_fraction=fraction)
            what = "off" if opt is None else opt + ("" if fraction == 1.0 else f", {fraction:.0%} of the blocks")
            print(f"| {gpus} | {what} | {pl.weights / gib:.1f} | {pl.optimizer / gib:.2f} | {pl.gradients / gib:.1f} | "
                  f"{pl.activations / gib:.1f} | {pl.kv_budget / gib:.1f} | "
                  f"{pl.sequences(s, context, 2) if pl.kv_budget > 0 else 'does not fit'} |")

if __name__ == "__main__":
    main()
