"""The live page (amygdala.view, served by the plugin at /amygdala/) in a real headless Chromium.

A live ``amygdala view`` on the tiny model (tests/helpers/serve.py) streams a chat; the test
sends the same request itself and checks the page against that stream: one coloured span per
token (the colour's sign is the valence computed here), panel numbers equal to the streamed
z-scores, the hysteresis list equal to a Python oracle of the rule, steering from a slider
equal to the same steered request sent directly. The exported JSON and HTML snapshot, and
``amygdala read --html`` (tests/test_view_offline.py), are opened in the browser with the network
blocked; the page's code without a server is tests/test_view_offline.py.

Chromium is Debian's (``./dev test`` installs it); a machine without it fails these tests
instead of skipping them.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import serve as sh
from helpers import view as vh
from helpers.view import CLUSTERS, ENTER_Z, EXIT_Z, PANEL_K, VALENCE, hysteresis, open_offline

vllm = pytest.mark.vllm
#: Module fixtures (tests/helpers/view.py): each module its own browser and files.
browser, files = vh.browser_fixture(), vh.files_fixture()

PROMPT = "w1 w2 w3 w4"


# --------------------------------------------------------------------------- oracles
def over_median(values) -> list[float]:
    """What the panel's entry rule sees for z-scores over neutral text (this module's readout
    has only neutral statistics): each concept's z minus the layer's median concept z, so a
    token that lifts every concept alike lists none (written independently of app.js)."""
    return [float(v) - float(np.sort(np.asarray(values, dtype=np.float32))[len(values) // 2]) for v in values]


def smooth(rows: list, n: int) -> list:
    """The page's smoothing, written independently of app.js: each row the mean of the last ``n``
    rows of its message that have a readout (itself included); rows without one stay None."""
    have = [np.asarray(r, dtype=np.float64) for r in rows if r is not None]
    out, k = [], 0
    for r in rows:
        if r is None:
            out.append(None)
            continue
        k += 1
        out.append(np.mean(have[max(0, k - n) : k], axis=0))
    return out


def page_smooth(server: sh.Server) -> int:
    """The smoothing the page applies by default: the server manifest's ``smooth``."""
    return int(server.get("/readout/manifest")[1]["smooth"])


def valence(row) -> float:
    w = np.array(VALENCE) - np.mean(VALENCE)
    return float(np.mean([(w * np.array(layer)).sum() / np.abs(w).sum() for layer in row]))


def nonblank(png: Path, box: dict) -> float:
    """Standard deviation of the pixels inside ``box`` (a blank region gives 0)."""
    import matplotlib.image

    img = matplotlib.image.imread(png)
    x0, y0 = int(box["x"]), int(box["y"])
    region = img[y0 : y0 + int(box["height"]), x0 : x0 + int(box["width"]), :3]
    return float(region.std())


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def servers(files):
    """(``amygdala view`` on the tiny model and its URL, a plugin server without a readout)."""
    pytest.importorskip("vllm")
    root, model, readout = files
    port = sh.free_port()
    log = root / "view.log"
    cmd = [sys.executable, "-m", "amygdala", "view", "--model", str(model), "--readout", str(readout),
           "--port", str(port), "--timeout", "300", "--", "--dtype", "float32", "--max-model-len", "1024",
           "--max-num-seqs", "16", *sh.ONE_PROCESS_ARGS]
    view = subprocess.Popen(cmd, env=sh.server_env(None, **sh.ONE_PROCESS_ENV), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    bare = sh.start_server(model, root / "bare.log", env=sh.server_env(None, VLLM_PLUGINS="amygdala"), wait=False,
                          one_process=True)
    try:
        deadline = time.monotonic() + 320
        url = None
        while url is None:
            if view.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"amygdala view did not print its address:\n{log.read_text()[-4000:]}")
            found = re.search(r"amygdala view: open (\S+)", log.read_text())
            url = found.group(1) if found else time.sleep(0.5)
        sh.wait_ready(bare, 300)
        yield url, sh.Server(view, port, log), bare
    finally:
        view.send_signal(signal.SIGINT)  # amygdala view stops its server on Ctrl-C
        try:
            view.wait(40)
        except subprocess.TimeoutExpired:
            view.kill()
        bare.stop()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.errors = errors
    yield pg
    context.close()
    assert not errors, f"the page raised: {errors}"


def open_page(page, url):
    page.goto(url)
    page.wait_for_function("window.amygdala && window.amygdala.state.model !== null")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "10")


def chat(page, text: str) -> None:
    before = page.evaluate("window.amygdala.state.messages.length")
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    page.wait_for_function(f"window.amygdala.state.messages.length >= {before + 2} && !window.amygdala.state.busy", timeout=60_000)
    page.wait_for_function("!window.amygdala.state.dirty")  # the last frame is drawn


def streamed(server: sh.Server, messages: list[dict], **extra) -> tuple[str, list]:
    """The same chat request the page sends, streamed: (text, one readout matrix per token)."""
    body = {"model": "", "messages": messages, "temperature": 0, "max_tokens": 10, "readout": "zscore",
            "logprobs": True, **extra}
    body["model"] = server.get("/models")[1]["data"][0]["id"]
    chunks = server.stream("/chat/completions", body)
    text, rows = "", []
    for c in chunks:
        for ch in c["choices"]:
            text += (ch.get("delta") or {}).get("content") or ""
            rows += ch.get("readout_tokens") or ([ch["readout"]] if ch.get("readout") is not None else [])
    return text, rows


# --------------------------------------------------------------------------- the live page
@vllm
def test_chat_tokens_colours_and_panel_follow_the_stream(servers, page, tmp_path):
    url, server, _ = servers
    open_page(page, url)
    assert "5 concepts" in page.inner_text("#readout-info")
    chat(page, PROMPT)
    text, raw = streamed(server, [{"role": "user", "content": PROMPT}])
    n = page_smooth(server)
    assert n > 1 and page.input_value("#smooth") == str(n)
    rows = smooth(raw, n)  # what the page shows: the manifest's smoothing over the message
    spans = page.locator(".msg.assistant .tok")
    assert spans.count() == len(rows) > 0
    assert "".join(spans.all_inner_texts()) == text
    # Every token is coloured by the sign of its valence (computed here from the stream).
    colours = page.evaluate("Array.from(document.querySelectorAll('.msg.assistant .tok'), s => s.style.backgroundColor && getComputedStyle(s).backgroundColor)")
    for row, colour in zip(rows, colours):
        v = valence(row)
        if abs(v) / 1.5 >= 0.05:
            assert colour.startswith("rgba(34, 150, 90" if v > 0 else "rgba(205, 55, 55"), (v, colour)
    assert any(colours), "no token got a colour"
    # The panel: the hysteresis list after the last token, with the streamed z-scores.
    listed = [[] for _ in sh.LAYERS]
    for row in rows:
        listed = [hysteresis(listed[l], over_median(row[l]), PANEL_K, ENTER_Z, EXIT_Z) for l in range(len(sh.LAYERS))]
    for l, layer in enumerate(sh.LAYERS):
        shown = page.locator(f'.pc[data-layer="{layer}"]')
        names = [shown.nth(i).get_attribute("data-concept") for i in range(shown.count())]
        assert names == [sh.CONCEPTS[c] for c in listed[l]]
        values = [float(v) for v in shown.locator(".val").all_inner_texts()]
        np.testing.assert_allclose(values, [rows[-1][l][c] for c in listed[l]], atol=0.006)
    # The cluster summary: mean over the cluster's concepts (one each here) and the layers.
    top = page.locator(".cl").first
    means = {CLUSTERS[c]: np.mean([rows[-1][l][c] for l in range(len(sh.LAYERS))]) for c in range(len(CLUSTERS))}
    assert top.get_attribute("data-cluster") == max(means, key=means.get)
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot))
    for region in ("#messages", "#panel"):
        assert nonblank(shot, page.locator(region).bounding_box()) > 0.02, f"{region} is blank in {shot}"


@vllm
def test_read_the_prompt_shows_its_tokens_with_their_readout(servers, page):
    url, server, _ = servers
    open_page(page, url)
    page.check("#read-prompt")
    chat(page, PROMPT)
    prompt = page.locator(".msg.prompt")
    assert prompt.count() == 1
    model = server.get("/models")[1]["data"][0]["id"]
    chunks = server.stream("/chat/completions", {"model": model, "messages": [{"role": "user", "content": PROMPT}],
                                                 "max_tokens": 2, "readout": "zscore", "readout_prompt": True})
    first = chunks[0]["choices"][0]
    assert prompt.locator(".tok").all_inner_texts() == first["prompt_tokens"]
    # The panel can pin a prompt token: its values are that token's streamed row, smoothed over
    # the prompt's rows before it (the first position, the attention sink, has none).
    assert first["prompt_readout"][0] is None
    shown = smooth(first["prompt_readout"], page_smooth(server))
    i = len(first["prompt_tokens"]) - 2
    prompt.locator(".tok").nth(i).click()
    layer = sh.LAYERS[0]
    for row in page.locator(f'.pc[data-layer="{layer}"]').all():
        c = sh.CONCEPTS.index(row.get_attribute("data-concept"))
        assert abs(float(row.locator(".val").inner_text()) - shown[i][0][c]) < 0.006
    # Smoothing off (1 token): the pinned token shows its own row.
    page.fill("#smooth", "1")
    page.dispatch_event("#smooth", "change")
    for row in page.locator(f'.pc[data-layer="{layer}"]').all():
        c = sh.CONCEPTS.index(row.get_attribute("data-concept"))
        assert abs(float(row.locator(".val").inner_text()) - first["prompt_readout"][i][0][c]) < 0.006
    # The next request's history is the conversation, not the prompt as read.
    sent = page.evaluate("window.amygdala.state.messages.map(m => m.role)")
    assert sent == ["user", "prompt", "assistant"]


@vllm
def test_hover_shows_each_layers_top_concepts(servers, page):
    url, server, _ = servers
    open_page(page, url)
    chat(page, PROMPT)
    _, raw = streamed(server, [{"role": "user", "content": PROMPT}])
    rows = smooth(raw, page_smooth(server))
    page.hover(".msg.assistant .tok >> nth=2")
    tip = page.locator("#tooltip")
    tip.wait_for(state="visible")
    text = tip.inner_text()
    for l, layer in enumerate(sh.LAYERS):
        assert f"layer {layer}" in text
        best = int(np.argmax(rows[2][l]))
        assert re.search(rf"{sh.CONCEPTS[best]}\s+{rows[2][l][best]:.2f}", text), text
    page.click(".msg.assistant .tok >> nth=2")  # pins that token in the panel
    assert "selected token #" in page.inner_text("#panel-token")
    page.keyboard.press("Escape")
    assert "latest token" in page.inner_text("#panel-token")


@vllm
def test_slider_steers_the_next_reply_only(servers, page):
    url, server, _ = servers
    open_page(page, url)
    page.fill("#search", "calm")
    page.press("#search", "Enter")
    track = page.locator('.track[data-concept="calm"]')
    assert track.count() == 1
    assert track.locator("canvas").count() == 1
    number = track.locator("input[type=number]")
    number.fill("40")
    number.dispatch_event("change")
    assert "calm +40" in page.inner_text("#steer-summary")
    chat(page, PROMPT)
    steered = page.locator(".msg.assistant").last
    assert "steered: calm +40" in steered.locator(".who").inner_text()
    page_text = "".join(steered.locator(".tok").all_inner_texts())
    want, _ = streamed(server, [{"role": "user", "content": PROMPT}], steer=[{"concept": "calm", "strength": 40}])
    plain, _ = streamed(server, [{"role": "user", "content": PROMPT}])
    assert page_text == want != plain
    # The slider and the number move together; back at 0 the next reply is unsteered.
    track.locator("input[type=range]").fill("0")
    assert page.inner_text("#steer-summary") == ""


@vllm
def test_concept_search_by_name_description_and_nearest_names(servers, page):
    url, _, _ = servers
    open_page(page, url)
    page.fill("#search", "rage")  # a word of angry's description
    assert page.locator('.sug[data-concept="angry"]').count() == 1
    page.fill("#search", "calmm")
    page.press("#search", "Enter")
    message = page.inner_text("#search-message")
    assert "unknown concept" in message and "calmm" in message and "calm" in message.split("nearest:")[1]
    assert page.locator(".track[data-concept]").count() == 0  # no concept's track was added
    page.click("#search-message a >> text=calm")
    assert page.locator('.track[data-concept="calm"]').count() == 1


@vllm
def test_exports_json_and_an_offline_html_snapshot(servers, page, browser, tmp_path):
    url, _, _ = servers
    open_page(page, url)
    chat(page, PROMPT)
    state = page.evaluate("window.amygdala.conversation()")
    with page.expect_download() as info:
        page.click("#export-json")
    data = json.loads(Path(info.value.path()).read_text())
    assert data["format"] == "amygdala-conversation" and data["version"] == 1 and data["alignment"] == "sampled"
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]
    assert data["messages"][1]["tokens"] == state["messages"][1]["tokens"]
    assert data["manifest"]["concepts"] == sh.CONCEPTS and "std" not in data["manifest"]
    with page.expect_download() as info:
        page.click("#export-html")
    snap = tmp_path / "snapshot.html"
    info.value.save_as(snap)
    n = page.locator(".msg.assistant .tok").count()
    offline = open_offline(browser, snap)
    try:
        assert offline.locator(".msg.assistant .tok").count() == n
        assert offline.locator("#composer").is_hidden()
        assert offline.locator(".pc").count() > 0
        assert offline.evaluate("window.amygdala.conversation().messages[1].tokens") == data["messages"][1]["tokens"]
    finally:
        offline.context.close()


@vllm
def test_server_without_readout_says_so(servers, page):
    _, _, bare = servers
    page.goto(f"http://127.0.0.1:{bare.port}/amygdala/")
    notice = page.locator("#notice")
    notice.wait_for(state="visible")
    assert "no readout" in notice.inner_text()
    assert page.locator("#send").is_disabled()
