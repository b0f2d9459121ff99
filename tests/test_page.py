"""The web page of `gtransformer serve` in a real browser: Debian's headless Chromium driven by Playwright.

Screenshots of each stage are saved under test-artifacts/ (or $GT_ARTIFACTS) for a person to look at.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import start_server, stop_server

playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")]
ARTIFACTS = Path(os.environ.get("GT_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


@pytest.fixture(scope="module")
def url(tmp_path_factory, make_run):
    # Wide enough that 400 tokens take a few seconds on CPU: long enough to press Stop mid-stream.
    run = make_run(tmp_path_factory.mktemp("page") / "run", context_length=512, d_model=128, n_layers=4,
                   expert_hidden=256)
    process, address = start_server(run, "--max-tokens-cap", "450", env_key=None)
    yield address
    stop_server(process)


@pytest.fixture
def page(url):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 390, "height": 844})  # a phone-sized screen
        page = context.new_page()
        page.goto(url + "/")
        yield page
        browser.close()


def test_generate_streams_stop_interrupts_and_chat_replies(page):
    expect = playwright_api.expect
    expect(page.locator("#generate")).to_have_text("Gerar")
    page.fill("#prompt", "Era uma vez uma casa")
    page.eval_on_selector("#max-tokens", "el => { el.value = 400; el.dispatchEvent(new Event('input')); }")
    page.click("#generate")
    expect(page.locator("#stop")).to_be_enabled()
    generated = page.locator("#output span:not(.prompt)")
    expect(generated).not_to_have_text("", timeout=30_000)  # text streams in
    page.screenshot(path=str(ARTIFACTS / "page-streaming.png"), full_page=True)
    page.click("#stop")
    expect(page.locator("#status")).to_contain_text("interrompido", timeout=10_000)
    assert "tokens/s" in page.inner_text("#status")
    stopped_at = len(generated.inner_text())
    page.wait_for_timeout(500)
    assert len(generated.inner_text()) == stopped_at  # nothing arrives after Stop
    expect(page.locator("#generate")).to_be_enabled()
    page.screenshot(path=str(ARTIFACTS / "page-stopped.png"), full_page=True)

    page.click("#lang")  # English, then back to Portuguese
    expect(page.locator("#generate")).to_have_text("Generate")
    page.click("#lang")
    page.click("#tab-chat")
    expect(page.locator("#generate")).to_have_text("Enviar")
    page.eval_on_selector("#max-tokens", "el => { el.value = 20; el.dispatchEvent(new Event('input')); }")
    page.fill("#prompt", "Olá! Como vai?")
    page.click("#generate")
    expect(page.locator(".msg.user")).to_have_text("Olá! Como vai?")
    expect(page.locator("#status")).to_contain_text("pronto", timeout=30_000)
    expect(page.locator(".msg.assistant")).to_have_count(1)
    page.screenshot(path=str(ARTIFACTS / "page-chat.png"), full_page=True)
