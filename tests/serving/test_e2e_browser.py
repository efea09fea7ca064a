"""End to end in headless Chromium: uvicorn serves the tiny model, the page uploads an image and shows the result.

Uses Debian's ``/usr/bin/chromium`` driven by Playwright (``playwright install`` is not needed); when it is
missing, ``scripts/install-browser.sh`` installs it (root + apt), else the test is skipped with the reason.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install-browser.sh"


@pytest.fixture(scope="session")
def chromium() -> Path:
    """The system Chromium, installed on first use where that is possible."""
    pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")
    if not CHROMIUM.exists():
        if not INSTALL_SCRIPT.is_file() or shutil.which("sh") is None:
            pytest.skip(f"{CHROMIUM} is missing and {INSTALL_SCRIPT} cannot be run")
        result = subprocess.run(["sh", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900)
        if result.returncode != 0 or not CHROMIUM.exists():
            reason = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
            pytest.skip(f"Chromium cannot be installed here: {reason}")
    return CHROMIUM


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server_url(predictor) -> Iterator[str]:
    """uvicorn in a thread on a free localhost port, serving create_app(predictor) with a token."""
    uvicorn = pytest.importorskip("uvicorn")
    from dermlab.serving.app import create_app

    port = _free_port()
    config = uvicorn.Config(create_app(predictor, api_token="tok"), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_page_predicts_an_uploaded_image(chromium, server_url, predictor, images, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    image = images.sample((64, 48), seed=5)
    path = tmp_path / "lesion.png"
    image.save(path)
    expected = predictor.classes[int(predictor.predict_images([image])[0].argmax())]

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            expect.set_options(timeout=30_000)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server_url)
            assert "research tool, not a medical device" in page.inner_text("body")
            assert page.is_visible("#disclaimer")

            # without the token the API refuses, and the page says so
            page.set_input_files("#file", str(path))
            expect(page.locator("#error")).to_contain_text("401")
            assert page.inner_text("#top-class") == ""

            page.fill("#token", "tok")
            page.set_input_files("#file", [])
            page.set_input_files("#file", str(path))
            expect(page.locator("#top-class")).not_to_be_empty()
            assert page.inner_text("#top-class") == expected
            assert page.inner_text("#error") == ""
            assert page.locator("#bars .bar-row").count() == len(predictor.classes)
            assert page.locator("#bars .bar-row").first.get_attribute("data-class") == expected
            expect(page.locator("#cam")).to_be_visible()
            assert page.locator("#cam").evaluate("img => img.complete && img.naturalWidth") == 64
            assert page.is_visible("#preview")
            assert errors == []
        finally:
            browser.close()
