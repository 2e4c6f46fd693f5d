"""The conversation format the page exports, and the self-contained offline HTML page of one.

A conversation (``amygdala-conversation``, version 1) is JSON::

    {"format": "amygdala-conversation", "version": 1, "created": "2026-11-29T14:00:00Z",
     "source": "page" | "amygdala read", "model": "...",
     "manifest": {...the readout's manifest: statistics_sets, no default mean/std...},
     "readout": "zscore" | "raw", "statistics": "neutral" | "emotional", "smoothed": 1,
     "alignment": "sampled" | "own",
     "messages": [{"role": "user" | "assistant" | "text", "content": "...", "steer": [...],
                   "tokens": [{"text": "...", "readout": [[...n_concepts...], ...n_layers] | null,
                               "tracks": {"emotionality": z, "valence": z}}]}]}

``alignment`` says which residual stream a token's matrix is: ``sampled`` (generated tokens:
the position whose forward pass sampled the token, as the server streams it) or ``own`` (a
teacher-forced text: the token's own position, as ``amygdala read`` reports it).

The offline page is the page itself (the same ``index.html``, ``style.css`` and ``app.js``) with
both files inlined and the conversation embedded, so it opens from disk with no server and no
network, read-only.

Why this module imports nothing of amygdala's: a readout's own ``TextScores._repr_html_`` (Jupyter)
renders through it, so :mod:`amygdala.readout` imports the view, not the other way round; the
readout and the scores it is handed are read by their attributes (``manifest``, ``scores``,
``tokens``, ``positions``, ``tracks``).
"""

from __future__ import annotations

import html
import json
import time
from importlib.resources import files
from typing import Any

CONVERSATION_FORMAT = "amygdala-conversation"
CONVERSATION_VERSION = 1
ASSETS = ("index.html", "style.css", "app.js")
#: Where index.html links its assets; replaced by their inline text in a snapshot.
_STYLE_LINK = '<link rel="stylesheet" href="style.css">'
_SCRIPT_TAG = '<script src="app.js"></script>'
_DATA_SLOT = "<!--snapshot-data-->"


def asset(name: str) -> bytes:
    """One of the page's files, from the installed package."""
    if name not in ASSETS:
        raise KeyError(name)
    return files("amygdala.view").joinpath("assets", name).read_bytes()


def manifest_of(readout: Any) -> dict:
    """The readout's manifest as a conversation carries it: values are already z-scored or raw,
    as ``readout`` says, so the default statistics are left out; every set's mean and std stay
    (``statistics_sets``) so the snapshot's statistics switch can turn z of one into z of another."""
    body = readout.manifest(stats=True)
    for key in ("mean", "std", "tracks_mean", "tracks_std"):
        body.pop(key, None)
    return body


def conversation_of_text(readout: Any, scored: Any, *, text: str, model: str = "") -> dict:
    """A teacher-forced readout of ``text`` as a one-message conversation."""
    rows = scored.scores.numpy().round(4)
    return {
        "format": CONVERSATION_FORMAT,
        "version": CONVERSATION_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": "amygdala read",
        "model": model,
        "manifest": manifest_of(readout),
        "readout": "zscore" if scored.zscore else "raw",
        # Which statistics the z-scores use and the smoothing `read` applied: the page converts
        # from the first and does not smooth again (its smoothing control shows the window).
        "statistics": scored.against,
        "smoothed": scored.smooth,
        "alignment": "own",
        "messages": [{
            "role": "text",
            "content": text,
            "steer": [],
            "tokens": [_token(scored, rows, i) for i in range(len(scored.tokens))],
        }],
    }


def _token(scored: Any, rows, i: int) -> dict:
    """One token of a teacher-forced text. Position 0 (the attention sink, z around -150 on the
    default model) carries no readout: the page then leaves it out of the panel, the colour and
    the sparklines. ``tracks``: emotionality and valence z (over neutral text, mean over layers)."""
    if scored.positions[i] == 0:
        return {"text": scored.tokens[i], "readout": None}
    out = {"text": scored.tokens[i], "readout": rows[i].tolist()}
    if scored.tracks is not None:
        out["tracks"] = {n: round(float(scored.tracks[i, :, k].mean()), 3) for k, n in enumerate(scored.track_names)}
    return out


def script_json(value) -> str:
    """JSON safe inside a ``<script>`` element: every ``<``, ``>`` and ``&`` as ``\\u003c`` etc.

    Why all three, not only ``</``: ``<!--<script`` puts the HTML parser in its "double escaped"
    state, where ``</script>`` no longer ends the element and the page renders nothing. JSON
    strings accept the escapes, so ``JSON.parse`` gives back the same text."""
    text = json.dumps(value, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def offline_html(conversation: dict) -> str:
    """The page with its assets inlined and ``conversation`` embedded: one file, no network."""
    page = asset("index.html").decode()
    style = asset("style.css").decode()
    script = asset("app.js").decode()
    data = script_json(conversation)
    for needle in (_STYLE_LINK, _SCRIPT_TAG, _DATA_SLOT):
        if needle not in page:
            raise RuntimeError(f"amygdala/view/assets/index.html lost its {needle!r} marker; reinstall amygdala")
    page = page.replace(_STYLE_LINK, f"<style>\n{style}\n</style>")
    page = page.replace(_DATA_SLOT, f'<script type="application/json" id="amygdala-snapshot">{data}</script>')
    return page.replace(_SCRIPT_TAG, f"<script>\n{script}\n</script>")


def notebook_html(conversation: dict, height: int = 520) -> str:
    """The offline page of ``conversation`` inside an ``<iframe srcdoc>``, for a Jupyter cell: the
    page's own style and script stay inside the frame instead of restyling the notebook, and the
    sandbox lets its script run (and its exports download) without reaching the notebook."""
    page = html.escape(offline_html(conversation), quote=True)
    return (f'<iframe class="amygdala-snapshot" sandbox="allow-scripts allow-downloads" '
            f'style="width:100%;height:{int(height)}px;border:1px solid #ccc" srcdoc="{page}"></iframe>')
