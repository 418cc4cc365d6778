"""The server's door in a real browser (headless chromium through selenium, as test_search_page_browser.py): a page
from another origin (a second local server on another port, under another name) tries to read the photos and run
the model, and DNS rebinding (another name mapped to 127.0.0.1 by the browser's resolver) reaches nothing. A web
app given with ``cors_origins`` can use the API.

Skipped where chromium, its driver or selenium is missing, unless MLX_BLIP2_BROWSER_TESTS=1 (then a failure).
"""

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conftest  # noqa: E402,F401  (the BLAS first, as in every test)
from test_search_page import TINY, make_library  # noqa: E402
from test_search_page_browser import ProbeSite, browser_missing, start_browser  # noqa: E402

from mlx_blip2.pipelines.retrieval import load_retrieval  # noqa: E402
from mlx_blip2.server import BackgroundServer, create_app  # noqa: E402

# The browser resolves these names to 127.0.0.1, as an attacker's DNS would after rebinding.
RESOLVER = "--host-resolver-rules=MAP attacker.test 127.0.0.1, MAP webapp.test 127.0.0.1"

# What another site's page tries: images (their size alone tells what is there), the page's JSON, the model API
# (a simple POST needs no preflight), and a CORS read. Each outcome lands in window.results.
PROBE = """<!doctype html><meta charset="utf-8"><title>probe</title><script>
const target = new URLSearchParams(location.search).get("target");
const id = new URLSearchParams(location.search).get("id");
window.results = {};
function image(name, url) {
  return new Promise(done => { const img = new Image();
    img.onload = () => { window.results[name] = "loaded " + img.naturalWidth; done(); };
    img.onerror = () => { window.results[name] = "blocked"; done(); };
    img.src = url; });
}
async function read(name, url, init) {
  try { const r = await fetch(url, init); window.results[name] = r.type === "opaque" ? "opaque" :
        r.status + " " + (await r.text()).slice(0, 300); }
  catch (e) { window.results[name] = "failed " + e.name; }
}
Promise.all([
  image("thumb", target + "/thumb/" + id), image("image", target + "/image/" + id),
  read("search", target + "/api/search?q=red"),
  read("models", target + "/v1/models"),
  read("embed", target + "/v1/embeddings", {method: "POST", headers: {"Content-Type": "application/json"},
       body: JSON.stringify({input: ["a red ball"]})}),
  read("blind", target + "/api/search?q=zebra", {mode: "no-cors"}),
  read("blind_post", target + "/v1/embeddings", {method: "POST", mode: "no-cors", body: '{"input": ["x"]}'}),
]).then(() => { window.done = true; });
</script><body></body>"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = browser_missing()
    if missing:
        pytest.skip(missing)
    driver = start_browser(str(tmp_path_factory.mktemp("chromium-door")), extra_flags=[RESOLVER])
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    site = ProbeSite(PROBE)
    lib = make_library(tmp_path_factory.mktemp("door-browser"), extras=False)
    app = create_app(load_retrieval(TINY), index=lib["db"], captions=[lib["captions"]], model_name="tiny-itm",
                     cors_origins=[f"http://webapp.test:{site.port}"])
    with BackgroundServer(app) as s:
        s.app = app
        yield s, site, lib
    site.close()


def probe(driver, page_url: str) -> dict:
    driver.get(page_url)
    end = time.monotonic() + 60
    while not driver.execute_script("return window.done === true"):
        assert time.monotonic() < end, json.dumps(driver.execute_script("return window.results"))
        time.sleep(0.05)
    return driver.execute_script("return window.results")


def some_id(lib) -> int:
    return next(iter(lib["ids"].values()))


@pytest.mark.parametrize("site_host", ["attacker.test", "127.0.0.1"])  # another site; another port of this one
def test_another_origins_page_reads_no_photo_and_runs_no_model(browser, setup, site_host):
    server, site, lib = setup
    jobs = server.app.state.worker.stats["jobs"]
    results = probe(browser, f"http://{site_host}:{site.port}/?target=http://127.0.0.1:{server.port}"
                             f"&id={some_id(lib)}")
    assert results["thumb"] == "blocked" and results["image"] == "blocked", results  # not even their size
    for name in ("search", "models", "embed"):
        assert results[name].startswith("failed"), results
    # Requests the browser sends without asking (no-cors) are answered by the door: the model never ran.
    assert results["blind"] == "opaque" and results["blind_post"] == "opaque", results
    assert server.app.state.worker.stats["jobs"] == jobs


def test_dns_rebinding_reaches_nothing(browser, setup):
    server, _, lib = setup
    jobs = server.app.state.worker.stats["jobs"]
    # The attacker's name now points at 127.0.0.1: to the browser this is the attacker's own origin.
    browser.get(f"http://attacker.test:{server.port}/?q=red")
    text = browser.find_element("tag name", "body").text
    assert "not allowed" in text and "attacker.test" in text and "red ball" not in text
    results = probe_same_origin(browser, server, lib)
    assert results["thumb"] == "blocked" and results["image"] == "blocked", results
    for name in ("search", "models", "embed", "blind", "blind_post"):
        assert results[name].startswith("403"), results
        assert "embedding" not in results[name] and "tiny-itm" not in results[name]
    assert server.app.state.worker.stats["jobs"] == jobs


def probe_same_origin(driver, server, lib) -> dict:
    """The probe run inside the rebound origin itself (so its requests are same-origin to the browser)."""
    driver.execute_script("document.open(); document.write(arguments[0]); document.close();",
                          PROBE.replace('new URLSearchParams(location.search).get("target")',
                                        f'"http://attacker.test:{server.port}"')
                               .replace('new URLSearchParams(location.search).get("id")', str(some_id(lib))))
    end = time.monotonic() + 60
    while not driver.execute_script("return window.done === true"):
        assert time.monotonic() < end
        time.sleep(0.05)
    return driver.execute_script("return window.results")


def test_a_web_app_given_with_cors_origin_uses_the_api(browser, setup):
    server, site, lib = setup
    results = probe(browser, f"http://webapp.test:{site.port}/?target=http://127.0.0.1:{server.port}"
                             f"&id={some_id(lib)}")
    assert results["thumb"].startswith("loaded") and results["image"].startswith("loaded"), results
    assert results["models"].startswith("200") and "tiny-itm" in results["models"], results
    assert results["embed"].startswith("200") and "embedding" in results["embed"], results
    assert results["search"].startswith("200 {\"query\":\"red\"")


def test_the_page_itself_still_works(browser, setup):
    server, _, lib = setup
    for host in ("127.0.0.1", "localhost"):
        browser.get(f"http://{host}:{server.port}/?q=red")
        end = time.monotonic() + 30
        while True:
            loaded = browser.execute_script(
                "const i = Array.from(document.querySelectorAll('#results img'));"
                "return i.length > 0 && i.every(x => x.complete && x.naturalWidth > 0)")
            if loaded:
                break
            assert time.monotonic() < end, host
            time.sleep(0.05)
        found = browser.execute_script(
            "return fetch('/api/search?q=blue').then(r => r.json()).then(j => j.results.length)")
        assert found > 0


def test_api_docs_work_offline(browser, setup):
    """The browser has no network here: Swagger UI renders every endpoint from this server's own files."""
    server, _, _ = setup
    browser.get(f"http://127.0.0.1:{server.port}/docs")
    end = time.monotonic() + 30
    while browser.execute_script("return document.querySelectorAll('.opblock').length") < 5:
        assert time.monotonic() < end, browser.page_source[:500]
        time.sleep(0.1)
    text = browser.find_element("tag name", "body").text
    assert "/v1/embeddings" in text and "/v1/chat/completions" in text
    hosts = browser.execute_script("return performance.getEntriesByType('resource').map(e => new URL(e.name).host)")
    assert set(hosts) == {f"127.0.0.1:{server.port}"}
