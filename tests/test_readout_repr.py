"""Readout._repr_html_: the Jupyter summary names the concepts, layers, method and model."""

from __future__ import annotations

import torch

from amygdala.readout import Readout


def test_readout_html_summary_names_what_it_is():
    v = torch.nn.functional.normalize(torch.randn(2, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    r = Readout(concepts=["calm", "<b>"], layers=[3], vectors={3: v},
                meta={"method": "diffmean", "model": {"name": "tiny-llama"}})
    html = r._repr_html_()
    assert html.startswith("<table") and "calm, &lt;b&gt;" in html and "<b>" not in html
    assert "<td style=\"text-align:left\">3</td>" in html and "diffmean" in html and "tiny-llama" in html
