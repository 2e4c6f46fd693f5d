"""The live page's code without a server, in a real headless Chromium: the panel's hysteresis
rule against an oracle, the offline snapshot's inlining, ``amygdala read --html`` against
``read``'s own scores, the page's routes and off switch. Split from tests/test_view.py (which
starts ``amygdala view``)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import view as vh
from helpers.view import ENTER_Z, EXIT_Z, asset, hysteresis, open_offline
from amygdala.readout import Readout

#: Module fixtures (tests/helpers/view.py): each module its own browser and files.
browser, files = vh.browser_fixture(), vh.files_fixture()


def test_hysteresis_rule_in_the_browser(browser):
    """app.js's rule against the oracle: entry, staying between the thresholds, leaving."""
    pg = browser.new_page()
    pg.set_content("<script>" + asset("app.js") + "</script>")
    step = "(a) => window.amygdala.hysteresisStep(a[0], a[1], {k: a[2], enter: a[3], exit: a[4]})"
    assert pg.evaluate(step, [[], [2.0, 0.5, 1.2], 1, 1.0, 0.5]) == [0]       # only the top 1 enters
    assert pg.evaluate(step, [[0], [0.7, 0.5, 1.2], 1, 1.0, 0.5]) == [2, 0]   # 0 stays (0.7 >= exit, rank < 2k)
    assert pg.evaluate(step, [[0, 2], [0.4, 0.5, 1.2], 1, 1.0, 0.5]) == [2]   # 0 leaves below exit
    assert pg.evaluate(step, [[0], [0.8, 0.9, 1.2], 1, 1.0, 0.5]) == [2]      # 0 leaves at rank 2 >= 2k
    assert pg.evaluate(step, [[], [0.9, 0.8], 2, 1.0, 0.5]) == []             # nothing reaches entry
    rng = np.random.default_rng(0)
    listed_js, listed_py = [], []
    for _ in range(200):
        values = (rng.normal(size=30) * 1.5).round(3).tolist()
        listed_js = pg.evaluate(step, [listed_js, values, 8, ENTER_Z, EXIT_Z])
        listed_py = hysteresis(listed_py, values, 8, ENTER_Z, EXIT_Z)
        assert listed_js == listed_py
    assert pg.evaluate("window.amygdala.nearestNames('anxius', ['anxious', 'calm', 'angry'], 2)") == ["anxious", "angry"]
    # A chunk of several tokens: pieces join to the text whatever the tokens' own strings lack.
    split = "(a) => window.amygdala.splitText(a[0], a[1])"
    assert pg.evaluate(split, [" w75 w118 w0", ["w75", "w118", "w0"]]) == [" w75", " w118", " w0"]
    assert pg.evaluate(split, ["Hello, world", ["Hello", ",", " world"]]) == ["Hello", ",", " world"]
    assert pg.evaluate(split, ["ab", ["x", "y"]]) == ["", "ab"]
    pg.close()


def test_statistics_switch_and_smoothing_against_the_readout(browser, tmp_path):
    """The page's statistics switch and smoothing give exactly ``Readout.zscore(raw, against)``
    and ``smooth_causal`` (the library's own functions, which ``read`` prints): z of one set
    turned into z of the other per layer and concept, a causal mean that skips the attention
    sink; the emotionality track drawn from the tokens' tracks."""
    from amygdala.readout import smooth_causal
    from amygdala.view import offline_html

    readout = Readout.load(vh.sh.make_readout(tmp_path / "ro", tracks=True))
    assert readout.default_statistics == "emotional"
    g = torch.Generator().manual_seed(5)
    raw = torch.randn(9, len(readout.layers), len(readout.concepts), generator=g) * 3  # 9 tokens
    tracks = torch.randn(9, len(readout.layers), 2, generator=g)
    z = {against: readout.zscore(raw, against) for against in ("emotional", "neutral")}
    manifest = readout.manifest()
    tokens = [{"text": f" t{i}", "readout": None if i == 0 else z["emotional"][i].tolist(),
               "tracks": None if i == 0 else tracks[i].tolist()} for i in range(9)]
    conv = {"format": "amygdala-conversation", "version": 1, "manifest": manifest, "readout": "zscore",
            "statistics": "emotional", "smoothed": 1, "alignment": "own",
            "messages": [{"role": "text", "content": "".join(t["text"] for t in tokens), "steer": [], "tokens": tokens}]}
    path = tmp_path / "snap.html"
    path.write_text(offline_html(conv))
    sink = torch.tensor([True] + [False] * 8)
    pg = open_offline(browser, path)
    try:
        def shown(i: int) -> list[float]:
            return pg.evaluate(f"Array.from(window.amygdala.state.tokens[{i}].row)")

        def emotionality(i: int) -> float:
            return pg.evaluate(f"window.amygdala.state.tokens[{i}].tracks.emotionality")

        assert pg.input_value("#smooth") == str(manifest.get("smooth", 1))
        for against, n in (("emotional", 1), ("neutral", 1), ("neutral", 4), ("emotional", 3)):
            pg.select_option("#statistics", against)
            pg.fill("#smooth", str(n))
            pg.dispatch_event("#smooth", "change")
            want = smooth_causal(z[against], n, skip=sink)
            want_emo = smooth_causal(tracks[..., 0].mean(-1), n, skip=sink)  # mean over the layers
            for i in range(1, 9):
                np.testing.assert_allclose(shown(i), want[i].flatten().tolist(), atol=1e-4, err_msg=f"{against}, {n}, token {i}")
                assert abs(emotionality(i) - float(want_emo[i])) < 1e-4
        assert pg.evaluate("window.amygdala.state.tokens[0].row") is None  # the sink has no readout
        assert pg.is_visible("#emotionality")
    finally:
        pg.context.close()


def test_snapshot_inlines_the_page_safely():
    from amygdala.view import offline_html

    assert "</script" not in asset("app.js").lower() and "<!--" not in asset("app.js")
    conv = {"format": "amygdala-conversation", "version": 1, "manifest": {"concepts": ["a"], "layers": [0]},
            "readout": "raw", "alignment": "own", "messages": [{"role": "text", "content": "</script><b>x",
            "steer": [], "tokens": [{"text": "</script><b>x", "readout": [[1.0]]}]}]}
    html = offline_html(conv)
    js = asset("app.js")
    for tag in ('<link rel="stylesheet" href="style.css">', '<script src="app.js">'):
        assert html.count(tag) == js.count(tag)  # the page's own reference was replaced by the file
    assert html.count("</script>") == 2  # the data's own "</script>" was escaped


def test_read_html_writes_a_snapshot_that_matches_read(files, browser, tmp_path):
    """``amygdala read --html``: the teacher-forced readout of a text as an offline page."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from amygdala.readout import DEFAULT_SMOOTH, score_text

    root, model, readout_path = files
    out = tmp_path / "read.html"
    text = "w5 w6 w7 w8 w9"
    proc = subprocess.run([sys.executable, "-m", "amygdala", "read", text, "--readout", str(readout_path),
                           "--model", str(model), "--html", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    readout = Readout.load(readout_path)
    hf = AutoModelForCausalLM.from_pretrained(model).eval()
    # read's default smoothing and statistics: the page shows what `read` prints.
    scored = score_text(hf, AutoTokenizer.from_pretrained(model), readout, text, smooth=DEFAULT_SMOOTH)
    pg = open_offline(browser, out)
    try:
        assert pg.locator(".msg.text .tok").all_inner_texts() == scored.tokens
        assert "teacher-forced" in pg.inner_text("#notice").lower()
        last = scored.scores[-1]
        for l, layer in enumerate(readout.layers):
            for row in pg.locator(f'.pc[data-layer="{layer}"]').all():
                c = readout.concepts.index(row.get_attribute("data-concept"))
                assert abs(float(row.locator(".val").inner_text()) - float(last[l, c])) < 0.006
    finally:
        pg.context.close()


def test_text_scores_render_in_jupyter_as_the_read_html_page(files, browser, tmp_path):
    """``TextScores._repr_html_``: the page ``read --html`` writes, in a sandboxed frame whose
    page draws the text's tokens and panel in a real browser (as a notebook cell would show it)."""
    import html as htmlmod
    import re

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from amygdala.readout import DEFAULT_SMOOTH, TextScores, score_text
    from amygdala.view import conversation_of_text, offline_html

    _, model, readout_path = files
    readout = Readout.load(readout_path)
    hf = AutoModelForCausalLM.from_pretrained(model).eval()
    text = "w5 w6 w7 w8 w9"
    scored = score_text(hf, AutoTokenizer.from_pretrained(model), readout, text, smooth=DEFAULT_SMOOTH)
    cell = scored._repr_html_()
    assert cell.startswith('<iframe class="amygdala-snapshot" sandbox="allow-scripts allow-downloads"')
    page = htmlmod.unescape(re.search(r'srcdoc="([^"]*)"', cell).group(1))
    stamp = re.compile(r'"created":"[^"]*"')
    assert stamp.sub("", page) == stamp.sub("", offline_html(conversation_of_text(readout, scored, text=text, model=readout.meta["model"]["name"])))
    # Scores made by hand, without their readout or text: the plain repr, not a broken page.
    assert TextScores(scored.tokens, scored.positions, scored.scores, True)._repr_html_() is None
    host = tmp_path / "notebook.html"
    host.write_text(f"<!doctype html><html><body><h1>cell</h1>{cell}</body></html>", encoding="utf-8")
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        pg = context.new_page()
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(host.as_uri())
        frame = pg.frame_locator("iframe.amygdala-snapshot")
        frame.locator(".msg.text .tok").first.wait_for()
        assert frame.locator(".msg.text .tok").all_inner_texts() == scored.tokens
        last = scored.scores[-1]
        layer = readout.layers[0]
        rows = frame.locator(f'.pc[data-layer="{layer}"]').all()
        assert rows
        for row in rows:
            c = readout.concepts.index(row.get_attribute("data-concept"))
            assert abs(float(row.locator(".val").inner_text()) - float(last[0, c])) < 0.006
        assert pg.inner_text("h1") == "cell" and not errors, errors  # the page stayed inside its frame
    finally:
        context.close()


def test_page_routes_and_the_off_switch(monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from amygdala.serve import page as page_routes
    from amygdala.serve.config import PAGE_ENV

    app = FastAPI()
    page_routes.attach(app)
    client = TestClient(app)
    r = client.get("/amygdala/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"] and b"app.js" in r.content
    assert client.get("/amygdala/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/amygdala", follow_redirects=False).status_code in (302, 307)
    assert client.get("/amygdala/../pyproject.toml").status_code == 404
    monkeypatch.setenv(PAGE_ENV, "0")
    off = FastAPI()
    page_routes.attach(off)
    assert TestClient(off).get("/amygdala/").status_code == 404


@pytest.mark.vllm  # imports vLLM
def test_serve_no_page_flag_sets_the_switch(files, monkeypatch):
    from amygdala.cli.main import build_parser
    from amygdala.serve.launch import vllm_argv
    from amygdala.serve.config import PAGE_ENV

    pytest.importorskip("vllm")
    monkeypatch.delenv(PAGE_ENV, raising=False)
    _, model, readout = files
    args = build_parser().parse_args(["serve", "--model", str(model), "--readout", str(readout), "--no-page"])
    assert vllm_argv(args)[1][PAGE_ENV] == "0"
    args = build_parser().parse_args(["serve", "--model", str(model), "--readout", str(readout)])
    assert PAGE_ENV not in vllm_argv(args)[1]
