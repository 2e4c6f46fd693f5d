"""Tiny random models and synthetic corpora for tests: built in-process, nothing downloaded.

The tokenizer is a word-level one trained here with the ``tokenizers`` library, so every word is
one token and a test can plant a direction in chosen words' embeddings.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
COMMON = [f"w{i}" for i in range(120)] + ["user", "assistant", "say", "something.", "Say", "."]
CONCEPT_WORDS = {c: [f"{c[:2]}{i}" for i in range(10)] for c in ("alpha", "beta", "gamma", "delta")}
SCENE_WORDS = [f"sc{i}" for i in range(10)]
#: Words for tests that need a large vocabulary (``make_model(extra_words=LEXICON)``): with
#: hundreds of words per concept no word repeats often, so word identity is isotropic noise.
LEXICON = [f"x{i}" for i in range(1200)]

ARCHS = {
    "llama": dict(model_type="llama"),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3"),
    "mistral": dict(model_type="mistral"),
    "gemma3_text": dict(model_type="gemma3_text"),
    "gpt2": dict(model_type="gpt2"),
}


def make_tokenizer(path: Path | None = None, extra_words: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    words = COMMON + [w for ws in CONCEPT_WORDS.values() for w in ws] + SCENE_WORDS + list(extra_words)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIALS)
    tok.train_from_iterator([" ".join(words)] * 2, trainer)
    # Like Llama's tokenizer: a BOS token in front, which readers must never pool at.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML
    if path is not None:
        fast.save_pretrained(path)
    return fast


def make_config(arch: str, vocab_size: int, *, hidden: int = 64, layers: int = 4, heads: int = 2):
    from transformers import AutoConfig

    head_dim = hidden // heads
    kw = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256, **kw)
    extra = dict(head_dim=head_dim) if arch in ("qwen3", "gemma3_text", "llama", "mistral") else {}
    if arch == "gemma3_text":
        extra.update(sliding_window=64, query_pre_attn_scalar=head_dim)
    return AutoConfig.for_model(
        ARCHS[arch]["model_type"], hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=256, tie_word_embeddings=False, **extra, **kw,
    )


def make_model(arch: str = "llama", path: Path | None = None, *, seed: int = 0, extra_words: Sequence[str] = (), **cfg):
    """(model, tokenizer); saved to ``path`` (a loadable model folder) when given."""
    torch.manual_seed(seed)
    tok = make_tokenizer(extra_words=extra_words)
    config = make_config(arch, len(tok), **cfg)
    model = AutoModelForCausalLM.from_config(config).eval()
    if path is not None:
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return model, tok


def plant(model, tokenizer, words: list[str], direction: torch.Tensor, scale: float) -> None:
    """Add ``scale * direction`` to the input embeddings of ``words``."""
    emb = model.get_input_embeddings().weight
    ids = tokenizer.convert_tokens_to_ids(words)
    with torch.no_grad():
        emb[ids] += scale * direction.to(emb)


def random_unit(hidden: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(hidden, generator=g)
    return v / v.norm()


def sentence(
    rng: random.Random,
    concept: str | None,
    n: int = 9,
    scene: bool = False,
    lexicon: dict[str, list[str]] | None = None,
    filler: Sequence[str] | None = None,
) -> str:
    """Filler words with the concept's words mixed in and one of them last (where pooling reads).

    ``lexicon`` maps concepts to their words (default CONCEPT_WORDS); ``filler`` defaults to
    the first 120 COMMON words.
    """
    lexicon = CONCEPT_WORDS if lexicon is None else lexicon
    filler = COMMON[:120] if filler is None else filler
    words = [rng.choice(filler) for _ in range(n)]
    if scene:
        for i in rng.sample(range(n), 3):
            words[i] = rng.choice(SCENE_WORDS)
    if concept is not None:
        for i in rng.sample(range(n - 1), 2):
            words[i] = rng.choice(lexicon[concept])
        words.append(rng.choice(lexicon[concept]))
    else:
        words.append(rng.choice(filler))
    return " ".join(words)


def write_corpus(
    root: Path,
    *,
    concepts=("alpha", "beta", "gamma"),
    per_concept: int = 8,
    baselines: int = 6,
    seed: int = 0,
    scene_concepts=(),
    scene_baselines: int = 0,
    lexicon: dict[str, list[str]] | None = None,
    filler: Sequence[str] | None = None,
) -> Path:
    """A synthetic corpus folder; ``scene_concepts`` positives also carry scene words.

    ``scene_baselines`` more baselines end in a scene word, so a scene planted in those words
    reaches the pooled (last-token) activation of that many negatives. ``lexicon`` and
    ``filler`` are passed to :func:`sentence`.
    """
    rng = random.Random(seed)
    (root / "stories").mkdir(parents=True)
    (root / "paired" / "room").mkdir(parents=True)
    lines = ['[lint]', 'min_words = 5', '', '[clusters.greek]', 'description = "test cluster"', '']
    for c in concepts:
        lines += [f"[concepts.{c}]", 'cluster = "greek"', f'description = "planted {c}"', ""]
    (root / "manifest.toml").write_text("\n".join(lines))
    for c in concepts:
        paras = [
            f"# setting: place {i % 3}\n{sentence(rng, c, scene=c in scene_concepts, lexicon=lexicon, filler=filler)}"
            for i in range(per_concept)
        ]
        (root / "stories" / f"{c}.txt").write_text("\n\n".join(paras) + "\n")
    base = [
        sentence(rng, None, scene=bool(scene_concepts) and i % 2 == 0, filler=filler) for i in range(baselines)
    ]
    base += [f"{sentence(rng, None, filler=filler)} {rng.choice(SCENE_WORDS)}" for _ in range(scene_baselines)]
    (root / "paired" / "room" / "baseline.txt").write_text("\n\n".join(base) + "\n")
    return root
