"""The playground in a real browser: headless Chromium from the OS packages, driven by Playwright through the
system browser's path (Playwright never downloads its own). It sends a chat (beside three other requests, so the
grid holds several colours), sees tokens arrive and the KV block grid change, and saves a screenshot (to the
test's tmp dir, or to $MINILLM_PLAYGROUND_SCREENSHOT: benchmarks/playground.png was made so). Skips, saying why,
without Chromium or Playwright."""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import httpx
import pytest

from minillm.serve.server import ServerThread
from serve_tiny import tiny_app, tiny_engine
from tiny import one_thread  # noqa: F401 (autouse fixture)

def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _others(url: str) -> None:
    for i in range(3):
        threading.Thread(target=httpx.post, args=(url + "/v1/completions",), daemon=True,
                         kwargs={"json": {"prompt": f"neighbour {i} " * (i + 1), "max_tokens": 30 + 5 * i,
                                          "ignore_eos": True}, "timeout": 30}).start()


def test_playground_streams_a_chat_and_shows_the_kv_grid(tmp_path):
    screenshot = Path(os.environ.get("MINILLM_PLAYGROUND_SCREENSHOT", tmp_path / "playground.png"))
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium); .ci/run installs it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    engine = tiny_engine(step_delay=0.03, max_model_len=128)  # slow enough for the page's 150 ms polls
    app, _ = tiny_app(engine)
    with ServerThread(app) as srv, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 640})
            page.goto(srv.url + "/")
            page.wait_for_function("document.getElementById('stats').textContent.startsWith('step')", timeout=10_000)
            assert page.locator("#grid div").count() == 128  # one cell per KV block, all free
            page.fill("#max-tokens", "40")
            page.fill("#prompt", "Hello engine")
            page.click("#send")
            _others(srv.url)
            # tokens arrive while the request runs, and its blocks light up in the grid
            page.wait_for_function("document.querySelector('.msg.assistant').textContent.length > 0",
                                   timeout=10_000)
            page.wait_for_function("Number(document.getElementById('grid').dataset.used) > 0", timeout=10_000)
            page.wait_for_function("document.querySelectorAll('#running span').length >= 2", timeout=10_000)
            page.wait_for_function("document.getElementById('steps').children.length >= 3", timeout=10_000)
            partial = page.locator(".msg.assistant").text_content()
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot))
            page.wait_for_function("document.querySelector('.msg.assistant').dataset.done === '1'", timeout=20_000)
            assert len(page.locator(".msg.assistant").text_content()) >= len(partial)
            # every request ends and the grid is empty again
            page.wait_for_function("Number(document.getElementById('grid').dataset.used) === 0", timeout=10_000)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 1000
