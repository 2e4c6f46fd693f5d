"""``amygdala eval``: held-out accuracy, emotion geometry and steering efficacy of a readout.

Everything is checked before the model loads (the readout, the corpus, the model's shape); then
one forward over the corpus at the readout's layers with its pooling, refits per fold from
those rows (no forward per fold), and generation for the steering check.
"""

from __future__ import annotations

import json
from pathlib import Path

from amygdala.corpus import Corpus
from amygdala.models import load_model
from amygdala.activations import collect
from amygdala.activations.collect import distinct
from amygdala.methods import METHODS, check_params
from amygdala.pipeline import matching_model
from amygdala.validity import pertoken
from amygdala.validity.pertoken import per_token, story_tokens_for
from amygdala.pipeline import corpus_for
from amygdala.validity.steering import SteeringConfig, steering_efficacy
from amygdala.validity.report import table, validity
from amygdala.readout import Readout

JSON_NAME, HTML_NAME = "eval.json", "eval.html"


def run_eval(
    readout_path: str | Path, corpus: Corpus, *, model: str | None = "default", device: str | None = None, dtype: str | None = None,
    steering: SteeringConfig | None = SteeringConfig(), batch_size: int = 16, progress: bool = True,
    max_folds: int | None = None,
) -> dict:
    readout = Readout.load(readout_path)
    for name in steering.concepts if steering is not None else []:
        readout.concept_index(name)  # an unknown name fails here, with the nearest ones, before the model loads
    corpus = corpus_for(readout, corpus)
    info = matching_model(readout, model)
    loaded, tokenizer, _ = load_model(info.path, device, dtype)
    method = readout.meta.get("method") or "diffmean"
    pooled_method = method in METHODS and not METHODS[method].needs_tokens
    # The per-token view keeps the held-out stories' tokens and the token moments from this same forward.
    tokens = story_tokens_for(corpus, distinct(corpus.text_list()), list(readout.layers), max_folds) if pooled_method else None
    acts = collect(
        loaded, tokenizer, corpus.text_list(), readout.layers, pooling=readout.pooling,
        chat_template=bool(readout.meta.get("chat_template")), batch_size=batch_size, progress=progress,
        on_tokens=tokens.add if tokens is not None else None,
    )
    result = {
        "readout": str(readout_path),
        "model": info.name,
        "concepts": list(readout.concepts),
        "clusters": corpus.cluster_of(),
        "validity": validity(readout, corpus, acts, max_folds=max_folds),
    }
    if tokens is not None:
        params = check_params(method, readout.meta.get("method_params") or {})
        result["validity"]["per_token"] = per_token(corpus, acts, tokens, method, max_folds=max_folds, **params)
    if steering is not None:
        valence = dict(zip(corpus.concepts, corpus.valence()))
        result["steering"] = steering_efficacy(loaded, tokenizer, readout, valence, steering)
    return result


def steering_table(s: dict) -> str:
    c = s["chosen"]
    lines = [f"steering ({s['judge']}), strength {c['strength']:.1f} = {c['fraction']} x mean residual norm"
             f"{'' if c['fluent'] else ' (no strength tried kept perplexity in bounds: the weakest is shown)'}; "
             f"unsteered: mean compound {s['unsteered']['mean_compound']:+.2f}, perplexity {s['unsteered']['perplexity']:.1f}",
             "concept              toward    mean shift   moved the intended way   perplexity"]
    for name, r in c["concepts"].items():
        lines.append(f"{name:<20} {r['direction']:<9}{r['mean_shift']:>+10.2f}{100 * r['moved_share']:>21.0f}%{r['perplexity']:>15.1f}")
    return "\n".join(lines)


def report_text(result: dict) -> str:
    parts = [table(result["validity"])]
    if result["validity"].get("per_token"):
        parts.append(pertoken.table(result["validity"]["per_token"]))
    if "steering" in result:
        parts.append(steering_table(result["steering"]))
    return "\n\n".join(parts)


def write(result: dict, out: str | Path) -> tuple[Path, Path]:
    """eval.json and a self-contained eval.html into folder ``out``."""
    from html import escape

    from amygdala.figures import STYLE
    from amygdala.validity.report import html_section

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jpath, hpath = out / JSON_NAME, out / HTML_NAME
    jpath.write_text(json.dumps(result, indent=1) + "\n")
    steering = f"<h2>Steering</h2><pre>{escape(steering_table(result['steering']))}</pre>" if "steering" in result else ""
    hpath.write_text(
        f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>amygdala eval</title><style>{STYLE}</style>"
        f"</head><body><h1>Evaluation of {escape(result['readout'])}</h1><p>model {escape(result['model'])}</p>"
        f"{html_section(result['validity'], result['concepts'], result['clusters'])}"
        f"{pertoken.html(result['validity']['per_token']) if result['validity'].get('per_token') else ''}"
        f"{steering}</body></html>\n"
    )
    return jpath, hpath
