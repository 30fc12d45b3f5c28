"""End to end in a real headless Chromium: upload an image, train, mix, download the package, reload.

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
        page.goto(studio_server.url)
        yield page
        browser.close()


def shot(page, name: str) -> None:
    page.wait_for_timeout(600)  # let images and transitions settle
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_upload_train_mix_and_download_in_the_browser(page, tmp_path):
    page.wait_for_selector("#train-start")
    assert "tiny random-weight models" in page.inner_text("#bs-banner")
    shot(page, "01-train-empty")

    page.locator("#train-image input[type=file]").set_input_files(str(EXAMPLES / "cat.jpg"))
    page.wait_for_selector("#train-crop img")
    page.get_by_text("Training settings").click()
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
    page.wait_for_function("document.querySelector('#mix-content input').value.startsWith('cat')")
    page.click("#mix-generate")
    page.wait_for_selector("#mix-slider img", timeout=TIMEOUT_MS)
    page.wait_for_selector("#mix-results img")
    assert "[v" in page.inner_text("#mix-used")
    shot(page, "05-mix")

    page.get_by_role("tab", name="Share").click()
    page.wait_for_function("document.querySelector('#share-package input').value.startsWith('cat')")
    page.click("#share-prepare")
    page.wait_for_selector("#share-download", state="visible")
    with page.expect_download() as download:
        page.click("#share-download")
    target = tmp_path / download.value.suggested_filename
    download.value.save_as(target)
    with zipfile.ZipFile(target) as archive:
        names = set(archive.namelist())
    assert {"cat/adapter.json", "cat/pytorch_lora_weights.safetensors", "cat/README.md"} <= names
    shot(page, "06-share")

    page.reload()  # the workspace and the job come back from the browser's storage and the job record
    page.wait_for_selector("#train-status .bs-done")
    assert "cat" in page.inner_text("#train-status")
    shot(page, "07-after-reload")


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
    shot(page, "08-bad-upload")
