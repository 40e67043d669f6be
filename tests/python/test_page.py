"""The web page at `/` of `quill serve` in headless Chromium: it loads, generates (streamed),
opens the explain view, draws the probability bars with the cut, re-draws them when a slider
moves, and draws the attention heat map. The page's `?selftest=1` mode drives its own buttons'
code paths and reports what it drew; a screenshot is kept in target/test-artifacts/.
"""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QUILL = os.environ.get("QUILL_BIN", str(ROOT / "target" / "release" / "quill"))
CORPUS = ROOT / "data" / "tinyshakespeare.txt"
BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(BROWSER is None, reason="no Chromium on this machine (./run-tests installs it with apt-get)")
def test_page_generates_explains_and_draws(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS.read_text()[:60000])
    model = tmp_path / "m"
    subprocess.run([QUILL, "train", "--data", corpus, "--out", model, "--tokenizer", "bpe:300", "--steps", "150",
                    "--eval-interval", "150", "--layers", "2", "--heads", "2", "--width", "48", "--context", "64",
                    "--batch", "8", "--lr", "1e-2", "--quiet"], check=True, capture_output=True)
    proc = subprocess.Popen([QUILL, "serve", "--model", model, "--port", "0", "--api-key", "k1"],
                            stderr=subprocess.PIPE, text=True)
    try:
        m = re.search(r"http://([0-9.]+:[0-9]+)", proc.stderr.readline())
        assert m
        url = f"http://{m.group(1)}/?selftest=1&key=k1"
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=60000"]
        dom = subprocess.run([BROWSER, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
        found = re.search(r'<div id="selftest">(ok|error) ([^<]*)</div>', dom)
        assert found, dom[-2000:]
        assert found.group(1) == "ok", found.group(2)
        r = json.loads(found.group(2).replace("&quot;", '"'))
        assert r["generated"] > 0 and r["surprisal"] > 1 and r["steps"] >= 2
        assert r["bars"] == 21 and r["cut"] > 0 and r["redrawn"]  # 20 candidates + the rest; top-k 3 cut some
        assert r["heat"] > 1000  # blue cells of the heat map were drawn
        out = ROOT / "target" / "test-artifacts"
        out.mkdir(parents=True, exist_ok=True)
        shot = out / "explain-view.png"
        subprocess.run([BROWSER, *flags, "--window-size=1200,1800", f"--screenshot={shot}", url],
                       capture_output=True, timeout=180)
        assert shot.stat().st_size > 10000
    finally:
        proc.terminate()
        proc.wait(timeout=10)
