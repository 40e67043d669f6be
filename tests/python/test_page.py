"""The web page at `/` of `quill serve`, driven in headless Chromium (through Playwright,
with the system's Chromium): it loads, generates (streamed), opens the explain view, draws
the probability bars with the cut, redraws them when a slider moves (the server recomputes
the cut: only `/v1/quill/cut` requests, no new generation), and draws the attention heat map. A screenshot is kept in target/test-artifacts/.
"""
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QUILL = os.environ.get("QUILL_BIN", str(ROOT / "target" / "release" / "quill"))
CORPUS = ROOT / "data" / "tinyshakespeare.txt"
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(BROWSER is None, reason="no Chromium on this machine (./run-tests installs it with apt-get)")
def test_page_generates_explains_and_draws(tmp_path):
    from playwright.sync_api import sync_playwright
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS.read_text()[:60000])
    model = tmp_path / "m"
    subprocess.run([QUILL, "train", "--data", corpus, "--out", model, "--tokenizer", "bpe:300", "--steps", "150",
                    "--eval-interval", "150", "--layers", "2", "--heads", "2", "--width", "48", "--context", "64",
                    "--batch", "8", "--lr", "1e-2", "--quiet"], check=True, capture_output=True)
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([QUILL, "serve", "--model", model, "--port", "0", "--api-key", "k1"],
                            stderr=open(log, "w"))
    try:
        for _ in range(200):
            m = re.search(r"http://([0-9.]+:[0-9]+)", log.read_text())
            if m:
                break
            time.sleep(0.05)
        assert m, log.read_text()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=BROWSER, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 1800})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://{m.group(1)}/?key=k1")
            page.wait_for_function("document.getElementById('layer').options.length == 2")
            assert "GPT-2" in page.inner_text("#model")

            # playground: a streamed completion
            page.fill("#prompt", "ROMEO:")
            page.fill("#max", "12")
            page.click("#go")
            page.wait_for_function("document.getElementById('status').textContent == 'done'", timeout=60000)
            assert len(page.inner_text("#out")) > len("ROMEO:")

            # explain view
            page.click("#tab-explain")
            page.fill("#xsteps", "4")
            page.click("#xgo")
            page.wait_for_selector("#bars .bar", timeout=60000)
            assert page.locator("#surprisal .tok").count() > 1
            assert page.locator("#steps .chip").count() >= 2
            assert page.locator("#bars .bar").count() == 21  # 20 candidates + all the others
            assert page.locator("#bars .bar.cut").count() == 0  # temperature 1, no top-k/top-p
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            before = page.inner_html("#bars")
            for sel, value in (("#t", "0.4"), ("#k", "3")):
                page.eval_on_selector(sel, "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", value)
            page.wait_for_function("document.querySelectorAll('#bars .bar.cut').length >= 17", timeout=30000)
            assert page.inner_html("#bars") != before  # top-k 3 keeps at most 3 of 20
            assert "temperature 0.4" in page.inner_text("#barnote")
            assert requests and all(u.endswith("/v1/quill/cut") for u in requests), requests
            page.locator("#steps .chip").nth(1).click()
            page.wait_for_function("document.getElementById('barnote').textContent.startsWith('Step 2')", timeout=30000)
            assert page.locator("#bars .bar.cut").count() >= 17  # the sliders' settings hold for every step

            # attention heat map
            page.click("#att")
            page.wait_for_function("document.getElementById('heatnote').textContent.length > 0", timeout=60000)
            blue = page.evaluate("""() => { const c = document.getElementById('heat');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
                for (let i = 0; i < d.length; i += 4) if (d[i + 2] > d[i] + 30) n++; return n; }""")
            assert blue > 1000

            out = ROOT / "target" / "test-artifacts"
            out.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out / "explain-view.png"), full_page=True)
            assert not errors, errors
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
