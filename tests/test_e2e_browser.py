"""End to end in a real headless Chromium: upload an image, train, mix, re-embed, download, push, reload.

Screenshots of every stage go to $BLOCKSTUDIO_SCREENSHOTS (default tests/artifacts/screenshots). The test
needs Playwright and Debian's `chromium` (`make browser` installs both); without them it is skipped.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, ROOT

CHROMIUM = os.environ.get("BLOCKSTUDIO_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = Path(os.environ.get("BLOCKSTUDIO_SCREENSHOTS") or ROOT / "tests" / "artifacts" / "screenshots")
TIMEOUT_MS = 300_000

playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (make browser)")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (make browser installs Debian's chromium)", allow_module_level=True)


@pytest.fixture
def page(studio_server):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.console_messages = []
        page.on("console", lambda message: page.console_messages.append(message.text))
        page.goto(studio_server.url)
        yield page
        browser.close()


def shot(page, name: str) -> None:
    page.wait_for_timeout(600)  # let images and transitions settle
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def error_toasts(page) -> list[str]:
    return [text for text in page.locator(".toast-body").all_inner_texts() if text.startswith("Error")]


def test_upload_train_mix_and_download_in_the_browser(page, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from tests.hub_standin import HUB_TOKEN

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # pushes go to the local stand-in

    page.wait_for_selector("#train-start")
    assert "tiny random-weight models" in page.inner_text("#bs-banner")
    assert "tiny-sdxl" in page.inner_text("#bs-banner")
    # The banner and the token hint follow the chosen method.
    page.get_by_text("SplitFlux · Flux").click()
    page.wait_for_function("document.querySelector('#bs-banner')?.innerText.includes('tiny-flux')")
    page.get_by_text("Training settings").click()
    token = page.locator("#train-token textarea, #train-token input").first
    page.wait_for_function("document.querySelector('#train-token input, #train-token textarea')"
                           "?.placeholder.includes('[c42]')")
    shot(page, "01-train-splitflux")
    page.get_by_text("B-LoRA · SDXL").click()
    page.wait_for_function("document.querySelector('#bs-banner')?.innerText.includes('tiny-sdxl')")
    assert "[v42]" in token.get_attribute("placeholder")
    shot(page, "01-train-empty")

    page.locator("#train-image input[type=file]").set_input_files(str(EXAMPLES / "cat.jpg"))
    page.wait_for_selector("#train-crop img")
    for label, value in (("Steps", "3"), ("Preview every N steps", "1")):
        box = page.get_by_label(label, exact=True)
        box.fill(value)
        box.press("Tab")
    shot(page, "02-train-ready")
    page.click("#train-start")
    page.wait_for_selector("#train-status .bs-done", timeout=TIMEOUT_MS)
    assert "Step 3 / 3" in page.inner_text("#train-status")
    shot(page, "03-train-done")

    page.get_by_role("tab", name="Library").click()
    page.wait_for_selector("#library-gallery img")
    shot(page, "04-library")

    page.get_by_role("tab", name="Mix").click()
    page.wait_for_function("document.querySelector('#mix-content input')?.value.startsWith('cat')")
    # Opening the settings shows the boxes left blank; Generate then uses the model's defaults.
    page.get_by_text("Generation settings").first.click()
    page.locator("#tab-mix").get_by_label("Steps", exact=True).wait_for()
    page.click("#mix-generate")
    page.wait_for_selector("#mix-slider img", timeout=TIMEOUT_MS)
    page.wait_for_selector("#mix-results img")
    assert "[v" in page.inner_text("#mix-used")
    assert error_toasts(page) == []
    shot(page, "05-mix")

    page.get_by_role("tab", name="Re-embed").click()
    page.wait_for_function("document.querySelector('#reembed-content input')?.value.startsWith('cat')")
    page.locator("#tab-reembed").get_by_text("Generation settings").click()
    page.click("#reembed-content-go")
    page.wait_for_selector("#reembed-content-gallery img", timeout=TIMEOUT_MS)
    assert error_toasts(page) == []
    shot(page, "06-reembed")

    page.get_by_role("tab", name="Share").click()
    page.wait_for_function("document.querySelector('#share-package input')?.value.startsWith('cat')")
    page.click("#share-prepare")
    page.wait_for_selector("#share-download", state="visible")
    with page.expect_download() as download:
        page.click("#share-download")
    target = tmp_path / download.value.suggested_filename
    download.value.save_as(target)
    with zipfile.ZipFile(target) as archive:
        names = set(archive.namelist())
    assert {"cat/adapter.json", "cat/pytorch_lora_weights.safetensors", "cat/README.md"} <= names
    assert "0.00 MB" not in page.inner_text("#share-contents")
    # A push that fails (a wrong token) still empties the token box.
    page.get_by_label("Repository", exact=True).fill("alice/browser-cat")
    page.get_by_label("Write token").fill(HUB_TOKEN[:-4] + "nope")
    page.click("#share-push")
    page.locator(".toast-body").filter(has_text="401").first.wait_for()
    page.wait_for_function("document.querySelector('#share-token input, #share-token textarea')?.value === ''")
    shot(page, "07-share")

    page.reload()  # the workspace and the job come back from the browser's storage and the job record
    page.wait_for_selector("#train-status .bs-done")
    assert "cat" in page.inner_text("#train-status")
    shot(page, "08-after-reload")
    # The empty loss plot of a fresh page no longer floods the console with warnings every second.
    assert not [m for m in page.console_messages if "Infinite extent" in m]


def test_a_bad_upload_shows_a_message_not_a_trace(page, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    page.wait_for_selector("#train-start")
    page.locator("#train-image input[type=file]").set_input_files(str(bad))
    page.click("#train-start")
    toast = page.locator(".toast-body").first
    toast.wait_for()
    text = toast.inner_text()
    assert "not an image" in text and "Traceback" not in text
    shot(page, "09-bad-upload")
