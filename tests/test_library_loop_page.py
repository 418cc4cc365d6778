"""Corrections and filters on the search page over plain HTTP (the browser tests are in
test_library_loop_browser.py): a correction reaches the sidecar (exiftool-valid XMP, other languages kept), the index
(search finds its words) and the corrections file; it needs --allow-edits, the page's own origin and its CSRF token."""

import json
import os
import re
import shutil
import subprocess
from urllib.parse import urlencode

import pytest

from mlx_blip2.server import missing_server_packages

if missing_server_packages():
    pytest.skip(f"the server extra is not installed ({', '.join(missing_server_packages())})",
                allow_module_level=True)

from test_search_page import KEY, TINY, get, id_of, make_library  # noqa: E402

from mlx_blip2.photo_index import PhotoIndex, search  # noqa: E402
from mlx_blip2.photo_index.corrections import corrections_path, read_corrections  # noqa: E402
from mlx_blip2.pipelines.retrieval import load_retrieval  # noqa: E402
from mlx_blip2.server import BackgroundServer, create_app  # noqa: E402
from mlx_blip2.server.page_auth import COOKIE, cookie_token  # noqa: E402

REQUIRED = os.environ.get("MLX_BLIP2_BROWSER_TESTS") == "1"  # CI: exiftool is installed with the browser


@pytest.fixture(scope="module")
def pipe():
    return load_retrieval(TINY)


@pytest.fixture(scope="module")
def lib(tmp_path_factory, pipe):
    return make_library(tmp_path_factory.mktemp("loop-page"), extras=False)


@pytest.fixture(scope="module")
def server(pipe, lib):
    app = create_app(pipe, index=lib["db"], captions=[lib["captions"]], model_name="tiny-itm", allow_edits=True)
    with BackgroundServer(app) as s:
        yield s


def csrf(html: str) -> str:
    return re.search(r'<meta name="csrf-token" content="([^"]+)">', html).group(1)


def post_caption(server, entry_id, caption, token, **headers):
    body = json.dumps({"caption": caption}).encode()
    head = {"Content-Type": "application/json", "X-CSRF-Token": token, **headers}
    status, _, data = get(server, f"/api/caption/{entry_id}", head, method="POST", body=body)
    return status, json.loads(data)


def exiftool_validate(path) -> str:
    if shutil.which("exiftool") is None:
        if REQUIRED:
            pytest.fail("exiftool is missing (apt-get install libimage-exiftool-perl)")
        pytest.skip("exiftool is missing (apt-get install libimage-exiftool-perl)")
    return subprocess.run(["exiftool", "-validate", "-warning", "-a", "-s", str(path)], capture_output=True,
                          text=True, check=True).stdout


def test_a_correction_reaches_sidecar_index_and_corrections_file(server, lib, pipe):
    _, _, body = get(server, "/?q=sunset")
    html = body.decode()
    token = csrf(html)
    assert html.count('class="edit"') == len(lib["ids"])
    sunset = id_of(lib, "sunset.jpg")
    status, record = post_caption(server, sunset, "  Grandma's  farm at zanzibar dusk ", token)
    assert status == 200, record
    assert record["caption"] == "Grandma's farm at zanzibar dusk" and record["corrected"] is True
    assert record["previous"] == "an orange sunset over purple hills"
    # The XMP sidecar: the x-default entry changed, the German one kept, valid to exiftool.
    xmp = str(lib["paths"]["sunset.jpg"]) + ".xmp"
    text = open(xmp, encoding="utf-8").read()
    assert "Grandma&#x27;s farm" in text or "Grandma's farm" in text
    assert '<rdf:li xml:lang="de">Sonnenuntergang</rdf:li>' in text
    report = exiftool_validate(xmp)
    assert "Validate" in report and ": OK" in report and "Warning" not in report, report
    out = subprocess.run(["exiftool", "-j", "-lang", "de", "-XMP-dc:Description", "-XMP-dc:Description-de", xmp],
                         capture_output=True, text=True, check=True).stdout
    assert "Sonnenuntergang" in out
    # The index: searching a word only the correction holds finds the photo, first.
    with PhotoIndex(lib["db"], create=False) as db:
        assert search(db, "zanzibar", k=3, pipeline=pipe)[0].path == str(lib["paths"]["sunset.jpg"])
    data = json.loads(get(server, "/api/search?" + urlencode({"q": "zanzibar", "k": 3}))[2])
    assert data["results"][0]["id"] == sunset and data["results"][0]["corrected"] is True
    # The corrections file beside the index.
    records = read_corrections(corrections_path(lib["db"]))
    assert [(r["path"], r["caption"], r["previous"]) for r in records] == [
        (str(lib["paths"]["sunset.jpg"]), "Grandma's farm at zanzibar dusk", "an orange sunset over purple hills")]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", records[0]["time"]) and len(records[0]["sha256"]) == 64
    # The page after a reload: the correction, marked.
    html = get(server, "/?q=zanzibar")[2].decode()
    assert "Grandma&#x27;s farm at zanzibar dusk" in html and 'class="corrected"' in html


def test_txt_sidecars_and_photos_without_one(server, lib):
    token = csrf(get(server, "/")[2].decode())
    green, teal = id_of(lib, "green-square.png"), id_of(lib, "teal-rings.png")
    assert post_caption(server, green, "the green door of the shed", token)[0] == 200
    assert lib["paths"]["green-square.png"].with_suffix(".txt").read_text() == "the green door of the shed\n"
    assert post_caption(server, teal, "ripples in a teal pond", token)[0] == 200  # no sidecar yet: an XMP
    xmp = str(lib["paths"]["teal-rings.png"]) + ".xmp"
    assert "ripples in a teal pond" in open(xmp, encoding="utf-8").read()
    assert ": OK" in exiftool_validate(xmp)
    # A second correction of the same photo: the last one wins in the corrections file.
    assert post_caption(server, teal, "ripples in a teal pond at noon", token)[0] == 200
    latest = {r["path"]: r for r in read_corrections(corrections_path(lib["db"]))}
    assert latest[str(lib["paths"]["teal-rings.png"])]["previous"] == "ripples in a teal pond"
    assert latest[str(lib["paths"]["teal-rings.png"])]["caption"] == "ripples in a teal pond at noon"


def test_corrections_are_refused_without_token_origin_or_json(server, lib):
    token = csrf(get(server, "/")[2].decode())
    red = id_of(lib, "red-circle.png")
    before = open(corrections_path(lib["db"]), "rb").read() if corrections_path(lib["db"]).exists() else b""
    assert post_caption(server, red, "hacked", "")[0] == 403
    assert post_caption(server, red, "hacked", "wrong-token")[0] == 403
    status, body = post_caption(server, red, "hacked", token, Origin="http://evil.example")
    assert status == 403 and "origin" in body["error"]["message"]
    status, _, _ = get(server, f"/api/caption/{red}", {"Content-Type": "text/plain", "X-CSRF-Token": token},
                       method="POST", body=b'{"caption": "hacked"}')
    assert status == 415
    assert post_caption(server, red, "   ", token)[0] == 400
    assert post_caption(server, 10 ** 6, "x", token)[0] == 404
    assert (open(corrections_path(lib["db"]), "rb").read() if corrections_path(lib["db"]).exists() else b"") == before
    assert json.loads(get(server, "/api/search?q=hacked&mode=text")[2])["results"] == []


def test_edits_are_off_by_default(pipe, tmp_path):
    lib = make_library(tmp_path, extras=False)
    app = create_app(pipe, index=lib["db"], model_name="tiny-itm")
    with BackgroundServer(app) as s:
        html = get(s, "/?q=red")[2].decode()
        assert 'class="edit"' not in html and "csrf-token" not in html
        status, body = post_caption(s, id_of(lib, "red-circle.png"), "x", "anything")
        assert status == 403 and "--allow-edits" in body["error"]["message"]
    assert not corrections_path(lib["db"]).exists()


def test_the_key_cookie_lets_the_page_correct(pipe, tmp_path):
    lib = make_library(tmp_path, extras=False)
    app = create_app(pipe, index=lib["db"], model_name="tiny-itm", allow_edits=True, api_key=KEY)
    with BackgroundServer(app) as s:
        cookie = {"Cookie": f"{COOKIE}={cookie_token(KEY)}"}
        token = csrf(get(s, "/", cookie)[2].decode())
        red = id_of(lib, "red-circle.png")
        assert post_caption(s, red, "a ruby ball", token)[0] == 401  # no key, no cookie
        assert post_caption(s, red, "a ruby ball", token, **cookie)[0] == 200


def test_filters_in_the_address(server, lib):
    folder = str(lib["lib"] / "holiday")
    holiday = {id_of(lib, n) for n in lib["paths"] if os.path.dirname(str(lib["paths"][n])) == folder}
    for mode in ("image", "text", "hybrid"):
        data = json.loads(get(server, "/api/search?" + urlencode({"q": "a", "folder": folder, "mode": mode}))[2])
        assert {r["id"] for r in data["results"]} <= holiday and data["filters"] == {"folder": folder}
    html = get(server, "/?" + urlencode({"folder": folder, "from": "1990-01-01", "to": "2999-12-31"}))[2].decode()
    assert {int(i) for i in re.findall(r'<img src="/thumb/(\d+)"', html)} == holiday  # no query: browse
    assert f'<option value="{folder}" selected>' in html and 'value="1990-01-01"' in html
    assert json.loads(get(server, "/api/search?q=x&to=2000-01-01")[2])["results"] == []
    for bad in ({"from": "yesterday"}, {"folder": "relative/dir"}, {"corrected": "maybe"}, {"mode": "sound"}):
        status, _, body = get(server, "/api/search?" + urlencode({"q": "x", **bad}))
        assert status == 400, bad
    corrected = json.loads(get(server, "/api/search?" + urlencode({"corrected": "yes", "k": 100}))[2])
    assert all(r["corrected"] for r in corrected["results"])
