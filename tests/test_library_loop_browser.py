"""Corrections on the search page in a real browser (headless chromium through selenium, as
test_search_page_browser.py): correct a caption with the keyboard, reload and see it, find the photo by a word only
the correction holds; the XMP sidecar holds it and exiftool validates it; a page from another origin cannot edit.

Skipped where chromium, its driver, selenium or exiftool is missing, unless MLX_BLIP2_BROWSER_TESTS=1 (CI): then a
failure.
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conftest  # noqa: E402,F401  (the BLAS first, as in every test)
from test_search_page import TINY, id_of, make_library  # noqa: E402
from test_search_page_browser import (  # noqa: E402
    REQUIRED,
    ProbeSite,
    browser_missing,
    loaded_thumbs,
    severe_logs,
    start_browser,
    status_of,
    wait,
)

from mlx_blip2.photo_index import PhotoIndex  # noqa: E402
from mlx_blip2.photo_index.captions import caption_row  # noqa: E402
from mlx_blip2.photo_index.corrections import corrections_path, read_corrections  # noqa: E402
from mlx_blip2.pipelines.retrieval import load_retrieval  # noqa: E402
from mlx_blip2.server import BackgroundServer, create_app  # noqa: E402

CORRECTION = "Biscuit the corgi naps by the barn"

# Another site's page tries every way to save a caption: a JSON fetch (preflighted), a blind text/plain POST, a
# form posted into a frame, and reading the page for its CSRF token. Each outcome lands in window.results.
EDIT_PROBE = """<!doctype html><meta charset="utf-8"><title>edit probe</title><body><script>
const q = new URLSearchParams(location.search), target = q.get("target"), id = q.get("id");
window.results = {};
async function attempt(name, url, init) {
  try { const r = await fetch(url, init); window.results[name] = r.type === "opaque" ? "opaque" :
        r.status + " " + (await r.text()).slice(0, 200); }
  catch (e) { window.results[name] = "failed " + e.name; }
}
const body = JSON.stringify({caption: "pwned by another site"});
const frame = document.createElement("iframe"); frame.name = "sink"; document.body.append(frame);
const form = document.createElement("form");
form.method = "POST"; form.enctype = "text/plain"; form.target = "sink"; form.action = target + "/api/caption/" + id;
const field = document.createElement("input"); field.name = '{"caption": "pwned", "x": "'; field.value = '"}';
form.append(field); document.body.append(form);
Promise.all([
  attempt("json", target + "/api/caption/" + id, {method: "POST", credentials: "include",
          headers: {"Content-Type": "application/json", "X-CSRF-Token": "guess"}, body: body}),
  attempt("blind", target + "/api/caption/" + id, {method: "POST", mode: "no-cors", credentials: "include",
          headers: {"Content-Type": "text/plain"}, body: body}),
  attempt("token", target + "/?q=red"),
  new Promise(done => { frame.onload = () => { window.results.form = "submitted"; done(); }; form.submit(); }),
]).then(() => { window.done = true; });
</script></body>"""


def exiftool() -> str:
    found = shutil.which("exiftool")
    if found is None:
        if REQUIRED:
            pytest.fail("MLX_BLIP2_BROWSER_TESTS=1 but exiftool is missing (apt-get install libimage-exiftool-perl)")
        pytest.skip("exiftool is missing (apt-get install libimage-exiftool-perl)")
    return found


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = browser_missing()
    if missing:
        pytest.skip(missing)
    driver = start_browser(str(tmp_path_factory.mktemp("chromium-loop")),
                           extra_flags=["--host-resolver-rules=MAP attacker.test 127.0.0.1"])
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    lib = make_library(tmp_path_factory.mktemp("loop-browser"), extras=False)
    app = create_app(load_retrieval(TINY), index=lib["db"], captions=[lib["captions"]], model_name="tiny-itm",
                     allow_edits=True)
    with BackgroundServer(app) as s:
        s.lib = lib
        yield s


def caption_on_page(driver, entry_id) -> str:
    return driver.execute_script(
        f"const h = document.querySelector('.hit[data-id=\"{entry_id}\"]');"
        "return h ? h.querySelector('.caption').textContent + (h.querySelector('.corrected') ? ' [corrected]' : '')"
        " : null")


def test_correct_a_caption_with_the_keyboard(browser, page_server):
    from selenium.webdriver.common.keys import Keys

    tool = exiftool()
    lib = page_server.lib
    sunset = id_of(lib, "sunset.jpg")
    browser.get(page_server.url + "/?" + urlencode({"q": "an orange sunset"}))
    loaded_thumbs(browser)
    # Keyboard only: down from the box into the grid, along to the photo, "e", type, Enter.
    box = browser.find_element("id", "q")
    box.send_keys(Keys.ARROW_DOWN)
    for _ in range(len(lib["ids"])):
        if browser.execute_script("return document.activeElement.closest('.hit').dataset.id") == str(sunset):
            break
        browser.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
    browser.switch_to.active_element.send_keys("e")
    field = browser.switch_to.active_element
    assert field.get_attribute("class") == "edit-input"
    assert field.get_attribute("value") == "an orange sunset over purple hills"
    assert browser.execute_script(  # the editor takes the caption's place
        "return getComputedStyle(document.activeElement.closest('.hit').querySelector('.caption')).display") == "none"
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(CORRECTION, Keys.ENTER)
    wait(browser, lambda: status_of(browser) == "caption saved", what="the correction to be saved")
    assert caption_on_page(browser, sunset) == CORRECTION + " [corrected]"
    # Reload: the server renders the correction.
    browser.refresh()
    loaded_thumbs(browser)
    assert caption_on_page(browser, sunset) == CORRECTION + " [corrected]"
    # The sidecar holds it (the German entry kept), and exiftool accepts the file.
    xmp = str(lib["paths"]["sunset.jpg"]) + ".xmp"
    assert CORRECTION in open(xmp, encoding="utf-8").read() and "Sonnenuntergang" in open(xmp).read()
    report = subprocess.run([tool, "-validate", "-warning", "-a", "-s", xmp], capture_output=True, text=True).stdout
    assert ": OK" in report and "Warning" not in report, report
    read = json.loads(subprocess.run([tool, "-j", "-XMP-dc:Description", xmp], capture_output=True,
                                     text=True).stdout)
    assert read[0]["Description"] == CORRECTION
    # A word only the correction holds finds the photo, typed into the box.
    box = browser.find_element("id", "q")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("corgi")
    wait(browser, lambda: "corgi" in status_of(browser), what="the search for the corrected word")
    first = browser.execute_script("return document.querySelector('#results .hit').dataset.id")
    assert first == str(sunset)
    assert [r["caption"] for r in read_corrections(corrections_path(lib["db"]))] == [CORRECTION]
    assert severe_logs(browser) == []


def test_filters_are_in_the_address(browser, page_server):
    from selenium.webdriver.support.ui import Select

    lib = page_server.lib
    folder = str(lib["lib"] / "holiday")
    browser.get(page_server.url + "/?" + urlencode({"q": "shapes"}))
    loaded_thumbs(browser)
    Select(browser.find_element("id", "folder")).select_by_value(folder)
    wait(browser, lambda: "folder=" in browser.current_url, what="the folder in the address")
    shown = browser.execute_script("return Array.from(document.querySelectorAll('.hit')).map(h => h.dataset.id)")
    in_folder = {str(i) for p, i in lib["ids"].items() if p.startswith(folder + "/")}
    assert shown and set(shown) <= in_folder
    url = browser.current_url
    browser.get(url)  # the bookmark gives the same results
    loaded_thumbs(browser)
    again = browser.execute_script("return Array.from(document.querySelectorAll('.hit')).map(h => h.dataset.id)")
    assert again == shown
    assert Select(browser.find_element("id", "folder")).first_selected_option.get_attribute("value") == folder


@pytest.mark.parametrize("site_host", ["attacker.test", "127.0.0.1"])  # another site; another port of this one
def test_a_page_from_another_origin_cannot_edit(browser, page_server, site_host):
    lib = page_server.lib
    red = id_of(lib, "red-circle.png")
    site = ProbeSite(EDIT_PROBE)
    try:
        browser.get(f"http://{site_host}:{site.port}/?" + urlencode({"target": page_server.url, "id": red}))
        end = time.monotonic() + 60
        while not browser.execute_script("return window.done === true"):
            assert time.monotonic() < end, browser.execute_script("return window.results")
            time.sleep(0.05)
        results = browser.execute_script("return window.results")
    finally:
        site.close()
    assert results["json"].startswith("failed") and results["token"].startswith("failed"), results
    assert results["blind"] == "opaque" and results["form"] == "submitted", results
    with PhotoIndex(lib["db"], create=False) as db:
        row = caption_row(db, red)
        assert row is None or not row[2]
    assert "pwned" not in json.dumps(read_corrections(corrections_path(lib["db"])))
    assert not lib["paths"]["red-circle.png"].with_suffix(".txt").exists()
    assert not Path(str(lib["paths"]["red-circle.png"]) + ".xmp").exists()
