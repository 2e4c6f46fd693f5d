"""How fast the live page keeps up with a stream, in headless Chromium (issue 13).

    ./dev bench view [--tokens 2000] [--concepts 207] [--layers 3] [--tracks 4] [--write]
    ./dev bench view --screenshot --readout OUT [--model default]   # docs/img/view.png

A conversation is streamed into the page one token per chunk, as the server sends them, with
random z-scores of the given shape, in Debian's Chromium driven by Playwright. Two runs in the
same browser, one after the other:

- readout: every token carries its ``[layers][concepts]`` matrix and ``--tracks`` tracks are
  picked (sparklines over the whole conversation, redrawn every token);
- baseline: the same tokens as plain text, no readout (what any chat page does).

Per token the page's own work is timed (handling the chunk and drawing the frame, forced
synchronously so the browser's frame clock does not enter): median and 95th percentile over the
first, middle and last 100 tokens, since the conversation and the sparklines grow. Then the
exported snapshot of each conversation is opened from disk: time until every token is drawn.
``--write`` puts the table into docs/view.md.

``--screenshot`` starts ``amygdala view`` on the model, sends a message with two concepts
tracked and writes the page to docs/img/view.png (the README's picture).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))  # tests.helpers: the tiny model and server the tests use

from validity import replace_block  # noqa: E402

from amygdala.view import offline_html  # noqa: E402

BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic"]

# Runs in the page: stream n tokens (random z-scores from a seeded generator when readout) and
# time each token's chunk handling + frame.
FEED = """async ([n, withReadout, tracks]) => {
  const A = window.amygdala, S = A.state;
  let seed = 12345;
  const rand = () => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed / 2147483648; };
  for (const name of tracks) A.addTrack(name);
  const msg = A.addMessage("assistant", "", []);
  const times = [];
  for (let i = 0; i < n; i++) {
    const ch = {delta: {content: " w" + (i % 500)}};
    if (withReadout) ch.readout = S.manifest.layers.map(() => Array.from({length: S.C}, () => (rand() - 0.5) * 4));
    const t0 = performance.now();
    A.onChunk(msg, {choices: [ch]});
    A.frame();
    times.push(performance.now() - t0);
  }
  return times;
}"""


def manifest(concepts: int, layers: int) -> dict:
    clusters = [f"cluster_{i % 24}" for i in range(concepts)]
    return {"concepts": [f"concept_{i}" for i in range(concepts)], "layers": list(range(10, 10 + 4 * layers, 4)),
            "hidden_size": 576, "site": "block_output", "zscore": True, "clusters": clusters,
            "valence": [round(((i * 37) % 200) / 100 - 1, 2) for i in range(concepts)],
            "descriptions": [f"description of concept {i}" for i in range(concepts)]}


def empty_snapshot(m: dict) -> dict:
    return {"format": "amygdala-conversation", "version": 1, "created": "", "source": "bench", "model": "",
            "manifest": m, "readout": "zscore", "alignment": "sampled", "messages": []}


def stats(times: list[float], lo: int, hi: int) -> tuple[float, float]:
    part = sorted(times[lo:hi])
    return statistics.median(part), part[int(0.95 * (len(part) - 1))]


def measure(args) -> str:
    from playwright.sync_api import sync_playwright

    m = manifest(args.concepts, args.layers)
    tmp = Path(tempfile.mkdtemp(prefix="bench-view-"))
    empty = tmp / "empty.html"
    empty.write_text(offline_html(empty_snapshot(m)))
    n = args.tokens
    windows = [(0, 100), (n // 2 - 50, n // 2 + 50), (n - 100, n)]
    results = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=BROWSER_ARGS)
        for mode, with_readout in (("baseline", False), ("readout", True)):
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(empty.as_uri())
            page.wait_for_function("window.amygdala && window.amygdala.state.manifest !== null")
            tracks = m["concepts"][: args.tracks] if with_readout else []
            times = page.evaluate(FEED, [n, with_readout, tracks])
            conv = page.evaluate("window.amygdala.conversation()")
            page.close()
            snap = tmp / f"{mode}.html"
            snap.write_text(offline_html(conv))
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            t0 = time.perf_counter()
            page.goto(snap.as_uri())
            page.wait_for_function(f"document.querySelectorAll('.tok').length === {n} && !window.amygdala.state.dirty",
                                   timeout=120_000)
            load = time.perf_counter() - t0
            page.close()
            results[mode] = (times, load, snap.stat().st_size)
            print(f"{mode}: {n} tokens fed, snapshot {snap.stat().st_size / 1e6:.1f} MB opened in {load:.2f} s", file=sys.stderr)
        browser.close()
    base, read = results["baseline"], results["readout"]
    lines = [
        f"Headless {args.chromium_version}, {n} tokens streamed one per chunk, readout of {args.concepts} "
        f"concepts x {args.layers} layers, {args.tracks} tracks; baseline: the same tokens as plain text, same run. "
        "Page work per token (chunk handling + frame), milliseconds:",
        "",
        "| tokens | baseline median / p95 | readout median / p95 | ratio of medians |",
        "| --- | --- | --- | --- |",
    ]
    for lo, hi in windows:
        bm, bp = stats(base[0], lo, hi)
        rm, rp = stats(read[0], lo, hi)
        lines.append(f"| {lo + 1}-{hi} | {bm:.2f} / {bp:.2f} | {rm:.2f} / {rp:.2f} | {rm / max(bm, 1e-3):.1f} |")
    lines += [
        "",
        f"Opening the exported snapshot of the whole conversation from disk until every token is drawn: "
        f"baseline {base[1]:.2f} s ({base[2] / 1e6:.1f} MB), readout {read[1]:.2f} s ({read[2] / 1e6:.1f} MB).",
    ]
    return "\n".join(lines)


def screenshot(args) -> None:
    """The page on a real model, for the README."""
    from playwright.sync_api import sync_playwright

    from tests.helpers import serve as sh

    port = sh.free_port()
    log = Path(tempfile.mkdtemp(prefix="bench-view-")) / "view.log"
    cmd = [sys.executable, "-m", "amygdala", "view", "--model", args.model, "--readout", str(args.readout),
           "--port", str(port), "--", "--max-model-len", "2048"]
    import os

    # The CPU build otherwise reserves most of the machine's memory for its KV cache.
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while not (found := re.search(r"amygdala view: open (\S+)", log.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"amygdala view did not start:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=BROWSER_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 860})
            page.goto(found.group(1))
            page.wait_for_function("window.amygdala && window.amygdala.state.model !== null")
            for name in args.track:
                page.evaluate("(n) => window.amygdala.addTrack(n)", name)
            page.fill("#temperature", "0")
            page.fill("#max-tokens", str(args.max_tokens))
            page.fill("#prompt", args.prompt)
            page.press("#prompt", "Enter")
            page.wait_for_function("window.amygdala.state.messages.length >= 2 && !window.amygdala.state.busy", timeout=300_000)
            page.wait_for_timeout(300)
            n = page.locator(".msg.assistant .tok").count()
            page.hover(f".msg.assistant .tok >> nth={max(0, n // 2)}")
            page.wait_for_timeout(200)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
            browser.close()
        print(f"wrote {args.out}", file=sys.stderr)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def main() -> None:
    import shutil

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--concepts", type=int, default=207)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--tracks", type=int, default=4)
    ap.add_argument("--write", action="store_true", help="put the table into docs/view.md")
    ap.add_argument("--screenshot", action="store_true", help="write docs/img/view.png from a live server instead")
    ap.add_argument("--readout", type=Path, help="readout for --screenshot")
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompt", default="My best friend moved away last week. How should I feel about it?")
    ap.add_argument("--track", action="append", default=[], help="concepts to track in the screenshot")
    ap.add_argument("--max-tokens", type=int, default=90)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "view.png")
    args = ap.parse_args()
    args.chromium = os.environ.get("AMYGDALA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if args.chromium is None:
        raise SystemExit("no chromium: ./dev bench view installs Debian's chromium (or set AMYGDALA_CHROMIUM)")
    args.chromium_version = subprocess.run([args.chromium, "--version"], capture_output=True, text=True).stdout.strip()
    if args.screenshot:
        if args.readout is None:
            raise SystemExit("--screenshot needs --readout OUT (a readout built for --model)")
        screenshot(args)
        return
    table = measure(args)
    print(table)
    if args.write:
        replace_block(ROOT / "docs" / "view.md", "view", table)
        print("wrote docs/view.md", file=sys.stderr)


if __name__ == "__main__":
    main()
