"""What the live page's tests share: the browser, the page's settings, the readout with clusters
and valence the page colours by, an independent oracle of the panel's rule, and opening an
offline page with the network blocked (tests/test_view.py with a server, tests/test_view_offline.py without)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from amygdala.readout import Readout

from . import serve as sh

CHROMIUM = os.environ.get("AMYGDALA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
#: Without the background-networking flags Chromium keeps dialling Google's hosts, which a
#: closed network refuses; --no-sandbox because CI runs as root.
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic"]
# The page's settings (app.js): the panel's K and hysteresis thresholds, the valence colour scale.
PANEL_K, ENTER_Z, EXIT_Z = 8, 1.0, 0.5
CLUSTERS = ["peaceful", "hostile", "joy", "fear", "engaged"]
VALENCE = [0.6, -0.7, 0.9, -0.8, 0.2]
DESCRIPTIONS = ["settled and at ease", "hot with rage", "bright with delight", "dread of harm", "wanting to know more"]


def make_files(root: Path) -> tuple[Path, Path, Path]:
    """(root, tiny model, readout with clusters, valence, arousal and descriptions)."""
    model = sh.make_tiny_model(root / "model")
    path = sh.make_readout(root / "readout")
    readout = Readout.load(path)
    readout.meta.update(clusters=CLUSTERS, valence=VALENCE, arousal=[0.2, 0.9, 0.7, 0.9, 0.5], descriptions=DESCRIPTIONS)
    readout.save(path)
    return root, model, path


def files_fixture():
    """A module fixture ``files``: :func:`make_files` once per module that assigns it."""

    @pytest.fixture(scope="module")
    def files(tmp_path_factory):
        return make_files(tmp_path_factory.mktemp("view"))

    return files


def browser_fixture():
    """A module fixture ``browser``: Debian's Chromium under Playwright, once per module that
    assigns it; a machine without it fails (never skips)."""

    @pytest.fixture(scope="module")
    def browser():
        if CHROMIUM is None:
            pytest.fail("no Chromium on this machine: ./dev test installs Debian's chromium (or set AMYGDALA_CHROMIUM)")
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
            yield b
            b.close()

    return browser


def hysteresis(listed: list[int], values, k: int, enter: float, exit: float) -> list[int]:
    """The panel's rule, written independently of app.js."""
    order = sorted(range(len(values)), key=lambda c: -values[c])
    out = []
    for rank, c in enumerate(order):
        if (rank < k and values[c] >= enter) or (c in listed and rank < 2 * k and values[c] >= exit):
            out.append(c)
    return out


def open_offline(browser, path: Path):
    """``path`` in a fresh page whose every non-file request fails (a snapshot must need none)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    errors, requests = [], []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:") else (requests.append(route.request.url), route.abort()))
    pg.goto(path.as_uri())
    pg.wait_for_function("window.amygdala && window.amygdala.state.manifest !== null")
    pg.wait_for_function("!window.amygdala.state.dirty")
    assert not errors and not requests, (errors, requests)
    return pg


def asset(name: str) -> str:
    from amygdala.view import asset as read

    return read(name).decode()
