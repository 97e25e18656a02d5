"""The web page as a person uses it, in headless Chromium: the model shown, an X-ray analysed, a bad file refused.

Needs selenium (requirements.txt) and Chromium with its chromedriver on PATH
(`scripts/install_browser.sh`); the module skips, saying which is missing, otherwise.
Selenium is handed both binaries, so Selenium Manager never downloads anything.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("selenium", reason="selenium is not installed: pip install -r requirements.txt")

import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import SHARED_DATA, encode, synthetic_xray
from xray.api import create_app
from xray.settings import Settings

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    missing = " and ".join(name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not path)
    pytest.skip(f"{missing} not on PATH: run scripts/install_browser.sh", allow_module_level=True)

WAIT_S = 20  # bound on every wait for the server or the page
SCREENSHOT = Path("/tmp/xray_page.png")


class LiveServer:
    """The real app under uvicorn, in a background thread, on a free port of 127.0.0.1."""

    def __init__(self, settings: Settings) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}/"
        config = uvicorn.Config(create_app(settings), log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError("the server stopped while starting; see the log above")
            try:
                with urllib.request.urlopen(self.url + "health", timeout=2) as response:
                    if json.load(response)["status"] == "ok":
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"the server at {self.url} did not answer /health within {WAIT_S} s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep the servers' downloaded model packages out of the working tree."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def served(trained_store: Path, model_cache: Path) -> Iterator[LiveServer]:
    """A server whose store holds the promoted smoke model."""
    server = LiveServer(Settings(storage_uri=str(trained_store), model_cache_dir=str(model_cache))).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def served_without_model(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[LiveServer]:
    """A server on an empty store: no model to load."""
    empty_store = tmp_path_factory.mktemp("empty") / "store"
    server = LiveServer(Settings(storage_uri=str(empty_store), model_cache_dir=str(model_cache))).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """One headless Chromium for the module, always quit."""
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                     "--window-size=1000,900"):  # fmt: skip
        options.add_argument(argument)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(WAIT_S)
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def xray_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first validation PNEUMONIA X-ray of the shared data, or a generated PNG when it is absent."""
    folder = SHARED_DATA / "val" / "PNEUMONIA"
    if folder.is_dir() and (files := sorted(path for path in folder.iterdir() if path.is_file())):
        return files[0]
    path = tmp_path_factory.mktemp("upload") / "xray.png"
    path.write_bytes(encode(synthetic_xray("PNEUMONIA", 3, size=400), "PNG"))
    return path


# --- what a person does on the page ------------------------------------------------------------------------------


def element(driver: WebDriver, element_id: str):
    return driver.find_element(By.ID, element_id)


def open_page(driver: WebDriver, server: LiveServer, model_line: str) -> None:
    """Load the page and wait until it says which model is in service."""
    driver.get(server.url)
    WebDriverWait(driver, WAIT_S).until(lambda d: element(d, "model").text.startswith(model_line),
                                        f"the model line never started with {model_line!r}")  # fmt: skip


def analyse(driver: WebDriver, path: Path) -> None:
    """Choose the file, press Analyse, and wait until the page shows a result or an error."""
    element(driver, "file").send_keys(str(path.resolve()))
    element(driver, "submit").click()
    WebDriverWait(driver, WAIT_S).until(
        lambda d: (
            element(d, "submit").is_enabled()
            and (element(d, "result").is_displayed() or element(d, "error").text.strip())
        ),
        f"no result and no error on the page within {WAIT_S} s after uploading {path.name}",
    )
    assert element(driver, "submit").text == "Analyse"


def assert_result(driver: WebDriver) -> None:
    """A label, probabilities in [0, 1], the version, and a heatmap that has loaded."""
    assert element(driver, "error").text == ""
    assert element(driver, "result").is_displayed()
    label = element(driver, "label")
    assert label.text in {"NORMAL", "PNEUMONIA"} and label.get_attribute("class") == label.text
    for field in ("probability", "threshold"):
        assert 0.0 <= float(element(driver, field).text) <= 1.0, field
    assert element(driver, "version").text == "smoke-model"
    assert float(element(driver, "time").text.removesuffix(" ms")) >= 0
    heatmap = element(driver, "heatmap")
    assert heatmap.get_attribute("src").startswith("data:image/png;base64,")
    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", heatmap) > 0,
        "the heatmap image did not load",
    )
    assert heatmap.is_displayed() and heatmap.size["width"] > 0


def script_errors(driver: WebDriver) -> list[str]:
    """Uncaught JavaScript errors logged by the page since the last call (failed HTTP requests are not these)."""
    return [entry["message"] for entry in driver.get_log("browser") if "Uncaught" in entry["message"]]


def test_page_shows_the_model_and_analyses_an_xray(browser, served, xray_file, tmp_path):
    open_page(browser, served, "Model: ")
    assert element(browser, "model").text == "Model: smoke-model"
    assert not element(browser, "result").is_displayed()

    analyse(browser, xray_file)
    assert_result(browser)
    browser.save_screenshot(str(tmp_path / "result.png"))
    shutil.copyfile(tmp_path / "result.png", SCREENSHOT)
    assert (tmp_path / "result.png").stat().st_size > 0
    assert script_errors(browser) == []


def test_page_refuses_a_file_that_is_not_an_image_and_recovers(browser, served, xray_file, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("not an X-ray, just some text with a .png name\n")
    open_page(browser, served, "Model: smoke-model")

    analyse(browser, xray_file)
    assert_result(browser)
    analyse(browser, fake)
    assert element(browser, "error").text.startswith("unsupported_format: ")
    assert not element(browser, "result").is_displayed(), "the previous result is still shown beside the error"

    analyse(browser, xray_file)  # the next good file clears the error
    assert_result(browser)
    assert script_errors(browser) == []


def test_page_says_when_no_model_is_loaded(browser, served_without_model, xray_file):
    open_page(browser, served_without_model, "No model")
    assert element(browser, "model").text.startswith("No model is loaded yet")

    analyse(browser, xray_file)
    assert element(browser, "error").text.startswith("model_not_ready: ")
    assert not element(browser, "result").is_displayed()
    assert script_errors(browser) == []
