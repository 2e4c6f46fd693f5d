"""What the quality report and the validity report's pages share: the style sheet, inline figures, the plots.

Why a package of its own: both reports draw their HTML from these, and neither report may import
the other's page code (``quality`` runs the validity evaluation, so a page helper kept in
``quality`` would import in a circle). Pages are self-contained: PNGs inline as base64.
"""

from __future__ import annotations

import base64
from html import escape

from amygdala.figures import plots

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1500px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; vertical-align: top; text-align: left; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0 2em; overflow-x: auto; }
figure img { max-width: none; }
figcaption { color: #555; font-size: 13px; }
section.concept { border-top: 1px solid #ddd; padding-top: 0.3em; }
.b-clean { color: #2a9d8f; } .b-mixed { color: #777; } .b-fragmented { color: #e76f51; }
.b-redundant { color: #8e44ad; } .b-wrong_cluster { color: #b8860b; }
code { font-size: 12px; }
"""


def _img(data: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(data).decode()}" alt="{escape(alt)}">'


def _figure(fid: str, data: bytes, caption: str) -> str:
    return f'<figure id="{fid}">{_img(data, caption)}<figcaption>{escape(caption)}</figcaption></figure>'


__all__ = ["STYLE", "_figure", "_img", "plots"]
