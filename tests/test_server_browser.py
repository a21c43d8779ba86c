"""The page at `/` in headless Chromium: clone a voice, type text, hear it while it streams.

Needs Debian's `chromium` and the `playwright` Python package (no browser download):
`bash scripts/setup_browser_test.sh`. Skips with the reason when either is missing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("COSYVOICE2_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--autoplay-policy=no-user-gesture-required",
]

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed: run scripts/setup_browser_test.sh"
)
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no chromium at {CHROMIUM}: run scripts/setup_browser_test.sh", allow_module_level=True)

from test_server import LiveServer, model_dir, prompt_wav  # noqa: E402

import cosyvoice2  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not model_dir().is_dir():
        pytest.skip(f"fixture model {model_dir()} not found; set COSYVOICE2_FIXTURES")
    tts = cosyvoice2.load(model_dir())
    with LiveServer(tts, data_dir=tmp_path_factory.mktemp("browser-voices"), max_active=2) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=30_000)
        except Exception as e:  # noqa: BLE001 - a broken local chromium is an environment problem
            pytest.skip(f"could not launch {CHROMIUM}: {str(e).splitlines()[0]}")
        yield b
        b.close()


def test_page_clones_a_voice_and_plays_streamed_audio(server, browser, tmp_path):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('voice-status').textContent.includes('saved voice')")

    # Clone a voice through the page; it is selected once saved.
    prompt = tmp_path / "prompt.wav"
    prompt.write_bytes(prompt_wav())
    page.set_input_files("#voice-file", str(prompt))
    page.fill("#voice-name", "browser voice")
    page.click("#upload")
    page.wait_for_function("document.getElementById('voice-status').textContent.startsWith('saved')")
    voice_id = page.eval_on_selector("#voice", "el => el.value")
    assert voice_id.startswith("v_")

    # Speak: audio frames arrive over the WebSocket and are scheduled on an AudioContext as they come.
    page.fill("#text", "Hi.")
    page.click("#speak")
    page.wait_for_function("window.cosyvoice.done || window.cosyvoice.error", timeout=60_000)
    state = page.evaluate("window.cosyvoice")
    assert state["error"] is None, state
    assert state["received"] > 0 and state["chunks"] >= 1 and state["firstPacketMs"] is not None
    assert state["result"]["audio_seconds"] == pytest.approx(state["received"] / 24000, abs=1e-3)
    # Every received sample is played through to the end by the audio clock.
    page.wait_for_function("window.cosyvoice.played >= window.cosyvoice.received", timeout=30_000)
    state = page.evaluate("window.cosyvoice")
    assert state["contextState"] == "running" and state["played"] == state["received"]
    assert "first audio after" in page.inner_text("#stats")
    assert not errors, errors
    page.close()
