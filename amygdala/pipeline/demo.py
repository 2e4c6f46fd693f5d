"""The demo's readout: built once from the bundled corpus and the default model, then reused.

Why a cache keyed by a hash: ``amygdala demo`` is the README's first command, and a build costs
about 3 minutes on 2 cores (a forward over 552 texts); a second run with the same corpus texts, model and settings reads the
same readout, so it is copied from the cache instead of built again. The key covers everything
that changes the file (the corpus's texts, the model's name, layers, method, pooling and
:data:`DEMO_CACHE_FORMAT`), so a changed input is never served a stale readout.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from amygdala import AmygdalaError
from amygdala.activations import DEFAULT_POOLING
from amygdala.corpus import bundled_corpus, load_corpus
from amygdala.models import load_model, model_info, resolve_model
from amygdala.models.resolve import amygdala_home
from amygdala.pipeline.build import BuildConfig, build
from amygdala.readout import Readout

#: The sentence ``amygdala demo`` reads when no --text is given: several feelings in one line.
DEMO_SENTENCE = "My hands were shaking as I opened the envelope, and then I laughed out loud: I got in."

#: The demo's named subset: 12 concepts from 9 clusters, built in about 3 minutes on 2 cores.
DEMO_CONCEPTS = ["terrified", "calm", "furious", "grief_stricken", "joyful", "bored",
                 "grateful", "proud", "lonely", "curious", "amused", "disgusted"]

#: Part of the demo cache's key: bumped when ``build`` starts writing something new into
#: readout.json (2: per-concept valence, arousal and descriptions, which the live page uses), so
#: a readout cached by an older amygdala is built again instead of reused without them; 3: the
#: mean-removed construction, both statistics sets and the emotionality and valence tracks; 4: the
#: valence track fitted by logistic regression instead of a difference of means).
DEMO_CACHE_FORMAT = 4


def demo_readout(
    out: str | Path, *, layers: str = "0.5,0.66", method: str = "diffmean", pooling: str = DEFAULT_POOLING,
    all_concepts: bool = False, rebuild: bool = False,
):
    """Write the demo's readout into ``out``: the cached one when it was built from the same
    corpus texts, model and settings, else a fresh build, cached for the next run.

    Args:
        out: folder the readout is written to.
        layers, method, pooling: as :class:`BuildConfig`'s; part of the cache key.
        all_concepts: every concept of the bundled corpus instead of :data:`DEMO_CONCEPTS`.
        rebuild: build again even when a cached readout fits.

    Returns:
        ``(loaded, how)``: the ``(model, tokenizer, info)`` the build loaded (``None`` when the
        cache was used, so the caller loads it only if it needs it) and a sentence saying which.
    """
    out = Path(out)
    corpus = load_corpus(bundled_corpus())
    if not all_concepts:
        corpus = corpus.subset(DEMO_CONCEPTS)
    info = model_info(resolve_model("default"))
    key = hashlib.sha256(
        f"{corpus.sha256()} {info.name} {layers} {method} {pooling} {DEMO_CACHE_FORMAT}".encode()
    ).hexdigest()[:16]
    cached = amygdala_home() / "readouts" / f"demo-{key}"
    what = f"{len(corpus.concepts)} concepts" + ("" if all_concepts else " (a named subset; --all for every concept)")
    if cached.is_dir() and not rebuild:
        try:
            Readout.load(cached)
            shutil.copytree(cached, out, dirs_exist_ok=True)
            return None, f"reused the cached readout of {what} ({cached}; --rebuild builds it again)"
        except AmygdalaError:
            pass  # a damaged cache is rebuilt below
    loaded = load_model(info.path, None)
    build(corpus, BuildConfig(layers=layers, method=method, pooling=pooling), out, loaded=loaded)
    shutil.copytree(out, cached, dirs_exist_ok=True)
    return loaded, f"built {what} from the bundled corpus, cached in {cached}"
