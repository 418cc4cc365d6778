"""The photo search page in a real browser: Debian's headless chromium through selenium (chromium-driver).

Skipped where chromium, its driver or selenium is missing, unless MLX_BLIP2_BROWSER_TESTS=1 (CI sets it): then
that is a failure. ``python tests/test_search_page_browser.py docs/search-page.png`` takes the README's screenshot.
"""

import http.server
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conftest  # noqa: E402,F401  (the BLAS first, as in every test)
from test_search_page import TINY, make_library  # noqa: E402

from mlx_blip2.pipelines.retrieval import load_retrieval  # noqa: E402
from mlx_blip2.server import BackgroundServer, create_app  # noqa: E402

REQUIRED = os.environ.get("MLX_BLIP2_BROWSER_TESTS") == "1"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def find_browser() -> tuple[str, str] | None:
    binary = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if os.path.exists(p)), None)
    return (shutil.which(binary), driver) if binary and driver else None


def start_browser(profile: str, size=(1280, 900), extra_flags=()):
    """A fresh headless chromium (its own profile folder; nothing from the network) through selenium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROME_FLAGS + [f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}", *extra_flags]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


class ProbeSite:
    """Another origin for the cross-site tests: a plain HTTP server answering every path with ``page``."""

    def __init__(self, page: str):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                data = page.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def browser_missing() -> str | None:
    """Why no browser test can run here (None when they can); a failure where MLX_BLIP2_BROWSER_TESTS=1."""
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install selenium)")
    if find_browser() is None:
        missing.append("chromium and chromium-driver (apt-get install chromium chromium-driver)")
    if missing and REQUIRED:
        pytest.fail(f"MLX_BLIP2_BROWSER_TESTS=1 but missing: {', '.join(missing)}")
    return f"no browser: {', '.join(missing)}" if missing else None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = browser_missing()
    if missing:
        pytest.skip(missing)
    driver = start_browser(str(tmp_path_factory.mktemp("chromium-profile")))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    lib = make_library(tmp_path_factory.mktemp("browser-lib"))
    app = create_app(load_retrieval(TINY), index=lib["db"], captions=[lib["captions"]], model_name="tiny-itm")
    with BackgroundServer(app) as s:
        s.lib = lib
        yield s


def wait(driver, condition, timeout=30.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; status: {status_of(driver)!r}")


def status_of(driver) -> str:
    return driver.execute_script("return (document.getElementById('status') || {}).textContent")


def thumbs(driver) -> list[dict]:
    """Every result image: its src, whether it finished loading, its natural width."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#results img')).map(i => "
        "({src: i.getAttribute('src'), complete: i.complete, width: i.naturalWidth}))")


def loaded_thumbs(driver, count=None) -> list[dict]:
    def ready():
        found = thumbs(driver)
        return found if found and (count is None or len(found) == count) and all(t["complete"] for t in found) \
            else None

    return wait(driver, ready, what="the thumbnails")


def severe_logs(driver) -> list[str]:
    """Console errors: a blocked or failed resource, a CSP violation, a script error."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_bookmarked_results_show_their_thumbnails(browser, page_server):
    lib = page_server.lib
    browser.get(page_server.url + "/?" + urlencode({"q": "a red ball", "k": 100}))
    found = loaded_thumbs(browser, len(lib["ids"]) - 2)  # all but the deleted one and the symlink out
    assert browser.title.startswith("a red ball")
    assert all(t["width"] > 0 for t in found), found
    assert "a red ball on a cream background" in browser.page_source
    assert "results for \u201ca red ball\u201d" in status_of(browser)
    assert severe_logs(browser) == []
    # The page served its thumbnails only from this server.
    hosts = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).host)")
    assert set(hosts) <= {f"127.0.0.1:{page_server.port}"}


def test_typing_updates_the_results(browser, page_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(page_server.url + "/")
    assert thumbs(browser) == [] and "photos indexed" in status_of(browser)
    box = browser.find_element(By.ID, "q")
    box.send_keys("sunset over hills")
    wait(browser, lambda: "sunset over hills" in status_of(browser), what="live results")
    first = loaded_thumbs(browser)
    assert first and all(t["width"] > 0 for t in first)
    assert browser.current_url.endswith("/?" + urlencode({"q": "sunset over hills", "k": 60}))
    browser.execute_script("document.querySelectorAll('#results .hit').forEach(h => h.dataset.old = '1')")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("blue striped fabric")
    wait(browser, lambda: "blue striped fabric" in status_of(browser), what="the second query's results")
    after = loaded_thumbs(browser)
    assert "blue and white striped fabric" in browser.page_source
    assert after and "blue striped fabric" in browser.title
    scores = browser.execute_script(
        "return Array.from(document.querySelectorAll('#results .score')).map(s => s.textContent)")
    assert len(scores) == len(after) and all(float(x) for x in scores)
    assert browser.execute_script("return document.querySelectorAll('#results .hit[data-old]').length") == 0
    # Keyboard: down into the grid, "m" for more like this (the image itself comes first).
    box.send_keys(Keys.ARROW_DOWN)
    focused = browser.execute_script("return document.activeElement.closest('.hit').dataset.id")
    browser.switch_to.active_element.send_keys("m")
    wait(browser, lambda: "images like" in status_of(browser), what="more like this")
    assert thumbs(browser)[0]["src"] == f"/thumb/{focused}"
    assert f"like={focused}" in browser.current_url
    assert severe_logs(browser) == []


def test_cards_keep_one_shape_whatever_the_images_shape(browser, tmp_path):
    """A tall (50x800) and a wide (2000x100) photo among ordinary ones: every card in a row as high as the others,
    every picture box square (the image cropped to fit, not stretching the row)."""
    from PIL import Image

    from mlx_blip2.photo_index import PhotoIndex, index_paths

    lib = tmp_path / "shapes"
    lib.mkdir()
    for name, size, colour in [("tall.png", (50, 800), (200, 40, 40)), ("wide.png", (2000, 100), (40, 40, 200)),
                               ("square.png", (300, 300), (40, 160, 40)), ("photo.png", (400, 300), (220, 200, 40))]:
        Image.new("RGB", size, colour).save(lib / name)
    with PhotoIndex(tmp_path / "shapes.sqlite") as db:
        index_paths(db, [lib], model=str(TINY), progress=False)
    app = create_app(load_retrieval(TINY), index=tmp_path / "shapes.sqlite", model_name="tiny-itm")
    with BackgroundServer(app) as s:
        for width in (1280, 700):  # four cards in a row, then two rows of two
            browser.set_window_size(width, 900)
            browser.get(s.url + "/?" + urlencode({"q": "a coloured picture"}))
            loaded_thumbs(browser, 4)
            boxes = browser.execute_script(
                "return Array.from(document.querySelectorAll('#results .hit')).map(h => {"
                "const r = h.getBoundingClientRect(), p = h.querySelector('.open').getBoundingClientRect();"
                "return {top: Math.round(r.top), height: r.height, width: r.width, ph: p.height, pw: p.width}; })")
            rows = {}
            for box in boxes:
                rows.setdefault(box["top"], []).append(box)
            assert len(rows) < 4, boxes  # cards share rows
            for row in rows.values():
                assert max(b["height"] for b in row) - min(b["height"] for b in row) < 1, boxes
            for box in boxes:
                assert abs(box["ph"] - box["pw"]) < 1 and box["height"] < box["width"] * 1.6, boxes
    browser.set_window_size(1280, 900)


def take_screenshot(out: str) -> None:
    """The README's screenshot: the page with a query, on the colourful library."""
    with tempfile.TemporaryDirectory() as tmp:
        lib = make_library(Path(tmp), extras=False)
        app = create_app(load_retrieval(TINY), index=lib["db"], captions=[lib["captions"]], model_name="tiny-itm")
        with BackgroundServer(app) as s:
            driver = start_browser(str(Path(tmp) / "profile"), size=(1100, 900))
            try:
                driver.get(s.url + "/?" + urlencode({"q": "colourful shapes"}))
                loaded_thumbs(driver, len(lib["ids"]))
                driver.execute_script("document.activeElement.blur()")
                driver.save_screenshot(out)
            finally:
                driver.quit()
    print(f"wrote {out}")


if __name__ == "__main__":
    take_screenshot(sys.argv[1] if len(sys.argv) > 1 else "docs/search-page.png")
