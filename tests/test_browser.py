"""The web page in a real browser: Debian's Chromium driven by Playwright against the running service.

Playwright's own browser download does not work here, so the test drives /usr/bin/chromium
(``apt-get install chromium``). It uploads a real DICOM, checks the rendered comparison, uses
the sample picker and the sliders, downloads the upscaled DICOM, and keeps a screenshot in
``tests/artifacts/browser/``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from medsr.data.sample_files import sample_file
from serving import REPO_ROOT, ServiceProcess

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO_ROOT / "tests" / "artifacts" / "browser"

# Missing tools fail the module rather than skip it: CI must not pass without the browser test.
try:
    import playwright.sync_api as playwright_api
except ImportError:  # pragma: no cover - the test extras install it
    pytest.fail("the playwright package is missing: pip install -e '.[test]' (never `playwright install`)",
                pytrace=False)
if not CHROMIUM.exists():  # pragma: no cover - .ci/run installs it
    pytest.fail("Chromium is missing: apt-get install -y chromium (the browser test drives /usr/bin/chromium)",
                pytrace=False)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    from test_serving import make_registry

    root = tmp_path_factory.mktemp("browser-registry")
    uri, _ = make_registry(root, [("espcn", 4, True)])
    with ServiceProcess(env={"MLFLOW_TRACKING_URI": uri}, log_path=root / "service.log", device="cpu") as running:
        yield running


@pytest.fixture()
def page(service: ServiceProcess, tmp_path: Path) -> Iterator[object]:
    with playwright_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            user_data_dir=str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1100}, accept_downloads=True)
        page = context.new_page()
        page.console_errors = []  # type: ignore[attr-defined]
        page.on("console", lambda message: message.type == "error" and page.console_errors.append(message.text))
        page.goto(service.url + "/")
        page.wait_for_function("document.querySelector('#service-status').textContent.startsWith('Ready')")
        yield page
        context.close()


def _wait_done(page: object) -> None:
    page.wait_for_function("['done', 'error'].includes(document.body.dataset.state)", timeout=120_000)
    assert page.evaluate("document.body.dataset.state") == "done", page.text_content("#error")


def _natural_size(page: object, panel: str) -> tuple[int, int]:
    return tuple(page.evaluate(  # type: ignore[return-value]
        f"(() => {{ const i = document.querySelector('#{panel} img'); return [i.naturalWidth, i.naturalHeight]; }})()"))


def test_upload_dicom_and_compare(page: object, tmp_path: Path) -> None:
    ct = sample_file("pydicom", "CT_small.dcm")  # a real CT slice, 128x128
    page.set_input_files("#file-input", str(ct))
    page.click("#run")
    _wait_done(page)

    # LR | bicubic | model (| original): the original is known, so it is shown and scored.
    assert _natural_size(page, "panel-lr") == (32, 32)
    assert _natural_size(page, "panel-bicubic") == (128, 128)
    assert _natural_size(page, "panel-model") == (128, 128)
    assert page.is_visible("#panel-original") and _natural_size(page, "panel-original") == (128, 128)
    for row in ("#score-bicubic", "#score-model"):
        assert re.fullmatch(r"\d+\.\d{2}", page.text_content(f"{row} .psnr"))
        assert re.fullmatch(r"0\.\d{4}", page.text_content(f"{row} .ssim"))
    assert re.fullmatch(r"\d+\.\d{2} dB", page.text_content("#consistency"))
    assert "ct, dicom" in page.text_content("#result-info")
    assert page.get_attribute("#download-png", "href").startswith("data:image/png;base64,")

    # Zoom enlarges every panel alike.
    before = page.evaluate("document.querySelector('#panel-model img').getBoundingClientRect().width")
    page.fill("#zoom", "3")
    page.dispatch_event("#zoom", "input")
    after = page.evaluate("document.querySelector('#panel-model img').getBoundingClientRect().width")
    lr_after = page.evaluate("document.querySelector('#panel-lr img').getBoundingClientRect().width")
    assert after == pytest.approx(3 * before, rel=0.02) and lr_after == pytest.approx(after, rel=0.02)

    # The whole file back as DICOM, through /upscale.
    page.click("#download-original")
    page.wait_for_selector("#download-original-link:not([hidden])", timeout=60_000)
    with page.expect_download() as download_info:
        page.click("#download-original-link")
    saved = tmp_path / "downloaded.dcm"
    download_info.value.save_as(saved)
    result = pydicom.dcmread(saved)
    assert (result.Rows, result.Columns) == (512, 512) and result.ImageType[0] == "DERIVED"

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "upload-dicom.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"browser screenshot: {shot}")
    assert shot.stat().st_size > 10_000
    assert not page.console_errors, page.console_errors  # type: ignore[attr-defined]


def test_sample_picker_and_sliders(page: object) -> None:
    page.select_option("#sample-select", "ct-ct-small")
    page.wait_for_function("!document.querySelector('#run').disabled")
    page.uncheck("#known-original")  # the sample itself is the input: no original to score against
    page.click("#run")
    _wait_done(page)
    assert _natural_size(page, "panel-lr") == (128, 128) and _natural_size(page, "panel-model") == (512, 512)
    assert page.is_hidden("#panel-original") and page.is_visible("#no-scores")
    quiet = page.text_content("#consistency")

    # Heavier noise through the slider: the page re-runs by itself and the score changes.
    page.evaluate("() => { window.lrBefore = document.querySelector('#panel-lr img').src; }")
    page.fill("#noise", "0.1")
    page.dispatch_event("#noise", "input")
    page.wait_for_function("document.querySelector('#panel-lr img').src !== window.lrBefore", timeout=60_000)
    _wait_done(page)
    assert page.text_content("#noise-value") == "0.100"
    assert page.text_content("#consistency") != quiet
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "sample-noisy.png"), full_page=True)
    assert not page.console_errors, page.console_errors  # type: ignore[attr-defined]


def test_error_is_shown_with_its_fix(page: object, tmp_path: Path) -> None:
    bad = tmp_path / "notes.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + b"\x01" * 300)
    page.set_input_files("#file-input", str(bad))
    page.click("#run")
    page.wait_for_function("document.body.dataset.state === 'error'", timeout=60_000)
    message = page.text_content("#error")
    assert "Fix:" in message and "HTTP 400" in message
