"""The web UI in headless Chromium (Debian's ``chromium`` driven by playwright's Python package).

One scenario on the tiny demo kit: open the config, make a value invalid and see the error next to the field,
fix it and save, cache and train from the page, see the loss curve get points and a sample appear, stop the run
and see its state saved. A screenshot of each page goes to the test's tmp dir (``screens/``).
Install the browser with ``make browser``; without it the test is skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make browser installs it)"),
]
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'")

BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]
WAIT_MS = 240_000


@pytest.fixture()
def server(tmp_path):
    """``wantrainer ui --port 0`` on a fresh demo folder; yields (url, root, config)."""
    from wantrainer.devkit.demo import prepare

    root = tmp_path / "work"
    config = prepare(root, steps=4)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "wantrainer.cli", "ui", "--root", str(root), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    line = proc.stdout.readline()
    assert line.startswith("wantrainer ui: http://127.0.0.1:"), line
    yield line.split(": ", 1)[1].strip(), root, config
    proc.terminate()  # the server stops its runs (SIGINT) and exits
    proc.wait(120)


def _set(page, key: str, value: str) -> None:
    box = page.locator(f'.field[data-key="{key}"] input')
    box.fill(value)
    box.dispatch_event("change")


def _wait_status(page, command: str, status: str) -> None:
    page.wait_for_function(f"document.querySelector('#progress-text').textContent.startsWith('{command}: {status}')",
                           timeout=WAIT_MS)


def test_config_run_watch_stop(server, tmp_path):
    url, root, config = server
    shots = tmp_path / "screens"
    shots.mkdir()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)
        page.wait_for_selector(f'#configs li[data-path="{config}"]')
        page.screenshot(path=str(shots / "1-configs.png"))

        # 1. open the config; an invalid value is reported next to its field; fixed, the config is OK again
        page.click(f'#configs li[data-path="{config}"]')
        page.wait_for_selector('.field[data-key="learning_rate"]')
        page.wait_for_function("document.querySelector('#verdict').textContent === 'config OK'")
        _set(page, "learning_rate", "-1")
        error = page.locator('.field[data-key="learning_rate"] .error')
        error.wait_for(timeout=30_000)
        assert "learning_rate" in error.inner_text()
        page.locator('.field[data-key="learning_rate"]').scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "2-invalid-value.png"))
        _set(page, "learning_rate", "0.01")
        page.wait_for_function("document.querySelector('#verdict').textContent === 'config OK'")
        assert page.locator(".field .error").count() == 0

        # 2. a longer run that samples and validates every 2 steps, saved from the form (comments kept)
        for key, value in (("max_train_steps", "400"), ("sample_every_n_steps", "2"),
                           ("validate_every_n_steps", "2"), ("save_every_n_steps", "200")):
            _set(page, key, value)
        page.click("#save")
        page.wait_for_function("document.querySelector('#verdict').textContent.endsWith('saved')")
        saved = tomllib.loads(config.read_text())
        assert saved["max_train_steps"] == 400 and saved["sample_every_n_steps"] == 2
        assert config.read_text().startswith("# Written by `wantrainer demo`")

        # 3. cache, then train, from the Runs tab
        page.click('.tab[data-tab="runs"]')
        for command in ("cache-latents", "cache-text"):
            page.click(f'#commands [data-command="{command}"]')
            _wait_status(page, command, "done")
        page.click('#commands [data-command="train"]')
        page.wait_for_function("/step [1-9]\\d*\\/400, ETA [\\d:]+, loss [\\d.]+, lr /.test(document.querySelector('#progress-text').textContent)",
                               timeout=WAIT_MS)
        page.screenshot(path=str(shots / "3-run.png"))

        # 4. the loss curve gets points, a sample appears
        page.click('.tab[data-tab="watch"]')
        page.wait_for_function("+(document.querySelector('.chart[data-chart=\"loss\"]')||{dataset:{}}).dataset.points >= 4",
                               timeout=WAIT_MS)
        page.wait_for_selector("#samples figure", timeout=WAIT_MS)
        page.wait_for_selector('.chart[data-chart="validation loss"]', timeout=WAIT_MS)
        media = page.locator("#samples figure video, #samples figure img").first
        assert "api/file" in media.get_attribute("src")
        # playable: the browser decoded the mp4 (a frame at least) or the image
        page.wait_for_function("(() => { const m = document.querySelector('#samples video, #samples img');"
                               " return m.tagName === 'VIDEO' ? m.readyState >= 2 && m.videoWidth === 64"
                               " : m.complete && m.naturalWidth === 64; })()", timeout=60_000)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(shots / "4-watch.png"), full_page=True)

        # 5. stop: the run finishes its step, saves a state and exits 130; the state is listed
        page.click('.tab[data-tab="runs"]')
        page.click("#stop")
        _wait_status(page, "train", "stopped")
        assert "(exit 130)" in page.inner_text("#progress-text")
        page.screenshot(path=str(shots / "5-stopped.png"))
        page.click('.tab[data-tab="watch"]')
        page.wait_for_selector('#saves tr[data-kind="state"]', timeout=30_000)
        page.screenshot(path=str(shots / "6-saved.png"), full_page=True)
        browser.close()
    states = [p for p in (root / "output").iterdir() if p.name.endswith("-state")]
    assert states, list((root / "output").iterdir())
    assert not errors, errors
