"""The inspect page: one coloured span per token, escaped text, the right summary numbers, and a real browser."""

from __future__ import annotations

import math
import os
import re
import subprocess
from pathlib import Path

import pytest

from qstar.core.inspect_report import hard_line, render_html, summarize_tokens, summary_line

CHROMIUM = Path("/usr/bin/chromium")
TOKENS = ["The", " cat", " <script>document.title='pwned'</script>", "\n", "  sat", " &", " on", " mat"]
BASE = [math.nan, -2.0, -5.0, -1.0, -3.0, -4.0, -1.0, -6.0]
THOUGHT = [math.nan, -1.0, -6.0, -1.0, -1.5, -3.5, -0.5, -2.0]
# gains over the 7 scored tokens: +1, -1, 0, +1.5, +0.5, +0.5, +4 -> mean 6.5 / 7, 5 of 7 helped
THOUGHTS = ["", "animal", '<b>bold</b> & "quoted"', "line", "verb", "and", "where", "rug"]


def page() -> str:
    return render_html(TOKENS, BASE, THOUGHT, THOUGHTS, "Quiet <STaR> & co")


def test_summary_numbers_on_a_hand_made_example():
    s = summarize_tokens(TOKENS, BASE, THOUGHT)
    assert s.scored == 7 and s.mean_gain == pytest.approx(6.5 / 7) and s.helped_share == pytest.approx(5 / 7)
    assert s.top == [(" mat", 4.0), ("  sat", 1.5), (" cat", 1.0), (" &", 0.5), (" on", 0.5)]
    assert summary_line(TOKENS, BASE, THOUGHT) == (
        "thinking changed log-prob by +0.929 nats/token on average over 7 tokens; 71.4% helped; "
        "most helped: ' mat' +4.000, '  sat' +1.500, ' cat' +1.000, ' &' +0.500, ' on' +0.500"
    )
    assert summarize_tokens(["a"], [math.nan], [math.nan]).scored == 0
    assert summary_line(["a", "b"], [-1.0, -1.0], [-2.0, -1.0]).endswith("0.0% helped; most helped: none")


def test_one_span_per_token_escaped_with_whitespace_kept():
    html = page()
    assert html.count('class="tok"') == len(TOKENS)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<b>" not in html and "&lt;b&gt;bold&lt;/b&gt; &amp; &quot;quoted&quot;" in html
    assert "<title>Quiet &lt;STaR&gt; &amp; co</title>" in html
    assert ">\n</span>" in html and ">  sat</span>" in html and "white-space: pre-wrap" in html
    assert "http" not in html and "<link" not in html  # self-contained
    assert html.count("rgba(22, 163, 74, 0.850)") >= 2  # " mat" saturates (beyond the 95th percentile), legend too
    assert "rgba(220, 38, 38" in html  # " <script>..." was hurt
    assert "+0.929 nats/token" in html and "&#x27; mat&#x27; +4.000" in html


def test_hard_tokens_are_scored_apart_and_underlined():
    hard = [False, False, False, False, True, False, False, True]  # "  sat" (+1.5) and " mat" (+4)
    assert hard_line(BASE, THOUGHT, hard) == (
        "2 hard tokens: NLL 4.500 without thoughts, 1.750 with (-2.750); "
        "5 other tokens: NLL 2.600 without thoughts, 2.400 with (-0.200)"
    )
    assert hard_line(BASE, THOUGHT, [True] + [False] * 7) is None  # the first token is not scored
    html = render_html(TOKENS, BASE, THOUGHT, THOUGHTS, "t", hard=hard)
    assert html.count('class="tok hard"') == 2 and "2 hard tokens: NLL 4.500" in html
    assert html.count("<tr><td>") == 2 and "<td>  sat</td><td>verb</td><td>3.000</td><td>1.500</td>" in html
    assert '<table class="hard-table">' not in page()


def test_lengths_must_agree():
    with pytest.raises(ValueError, match="3 tokens, 2 log-probs and 2 thoughts"):
        render_html(["a", "b", "c"], [0.0, 0.0], [0.0, 0.0], ["", ""], "t")
    with pytest.raises(ValueError, match="2 base log-probs but 1 thoughtful"):
        summary_line(["a", "b"], [0.0, 0.0], [0.0])


def test_page_in_a_headless_browser(tmp_path):
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: apt-get install -y chromium"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    path = tmp_path / "page.html"
    path.write_text(page(), encoding="utf-8")
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--dump-dom",
        path.as_uri(),
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    dom = out.stdout
    assert len(re.findall(r'<span class="tok"', dom)) == len(TOKENS)
    assert "<title>Quiet &lt;STaR&gt; &amp; co</title>" in dom  # the token's script never ran
    assert "<script" not in dom
