"""The page a person watches: a chat with the served model, each token coloured by its valence,
the per-layer top concepts held steady by hysteresis, sparklines of chosen concepts, steering
sliders, and exports (JSON and a self-contained offline HTML page).

The page is static files shipped inside the package (``assets/``: no CDN, no build step, no
network at run time). The vLLM plugin serves them (:mod:`amygdala.serve.page`); the same files,
inlined around a conversation's data, make the offline page (:mod:`amygdala.view.offline`,
``amygdala read --html``).
"""

from amygdala.view.offline import (
    CONVERSATION_FORMAT,
    CONVERSATION_VERSION,
    asset,
    conversation_of_text,
    manifest_of,
    notebook_html,
    offline_html,
)

__all__ = [
    "CONVERSATION_FORMAT",
    "CONVERSATION_VERSION",
    "asset",
    "conversation_of_text",
    "manifest_of",
    "notebook_html",
    "offline_html",
]
