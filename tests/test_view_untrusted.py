"""The offline snapshot embeds texts someone else wrote (issue 24): its JSON escapes every <, > and &
(Python's read --html and the page's own export alike), so no text can end or confuse the element."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from amygdala.view import asset, offline_html

HOSTILE = "see <!--<script> tag </script> & <b>x</b> \u2028 end"
CONV = {"format": "amygdala-conversation", "version": 1, "manifest": {"concepts": ["a"], "layers": [0]},
        "readout": "raw", "alignment": "own", "messages": [{"role": "text", "content": HOSTILE, "steer": [],
                                                            "tokens": [{"text": HOSTILE, "readout": [[1.0]]}]}]}


def _data(html: str) -> str:
    m = re.search(r'<script type="application/json" id="amygdala-snapshot">(.*?)</script>', html, re.S)
    assert m, "no data element"
    return m.group(1)


def test_the_snapshot_json_holds_no_angle_bracket_or_ampersand():
    data = _data(offline_html(CONV))
    assert not set("<>&") & set(data)
    assert json.loads(data) == CONV  # the escapes are JSON's own: the text comes back unchanged


def _export_line() -> str:
    js = asset("app.js").decode()
    lines = [line.strip() for line in js.splitlines() if "JSON.stringify(conversation()).replace(" in line]
    assert len(lines) == 1, "the export's escaping line moved; update this test"
    return lines[0]


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_page_export_escapes_like_read_html():
    script = f"const conversation = () => ({json.dumps(CONV)});\n{_export_line()}\nprocess.stdout.write(data);"
    out = subprocess.run(["node", "-e", script], capture_output=True, text=True, check=True).stdout
    assert not set("<>&") & set(out) and json.loads(out) == CONV
