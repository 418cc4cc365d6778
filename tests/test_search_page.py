"""The photo search page (mlx_blip2/server/search_page.py): pages, JSON, thumbnails, full images, captions, the API
key cookie, and requests that try to reach files outside the index (plain HTTP, on loopback, with the tiny
retrieval checkpoint). The browser tests are in test_search_page_browser.py."""

import base64
import hashlib
import http.client
import io
import json
import os
import re
import sys

import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image, ImageDraw

from mlx_blip2.server import missing_server_packages

if missing_server_packages():
    pytest.skip(f"the server extra is not installed ({', '.join(missing_server_packages())})",
                allow_module_level=True)

from mlx_blip2.photo_index import PhotoIndex, index_paths, search  # noqa: E402
from mlx_blip2.pipelines.retrieval import load_retrieval  # noqa: E402
from mlx_blip2.server import BackgroundServer, create_app, thumbnails  # noqa: E402
from mlx_blip2.server.page_auth import COOKIE, safe_next  # noqa: E402

TINY = FIXTURES / "tiny-blip2-itm"
KEY = "page-key-42"
UTF8_FS = sys.platform != "win32"
SECRET = b"TOP-SECRET-OUTSIDE-THE-LIBRARY"

# name -> (colours, shape): a small library of colourful pictures (also the README screenshot's)
PICTURES = {
    "red-circle.png": ((220, 40, 40), (250, 240, 200), "circle"),
    "blue-stripes.jpg": ((30, 80, 200), (240, 240, 250), "stripes"),
    "green-square.png": ((40, 170, 70), (30, 30, 40), "square"),
    "sunset.jpg": ((250, 140, 30), (120, 30, 120), "gradient"),
    "yellow-triangle.png": ((245, 205, 30), (40, 60, 120), "triangle"),
    "teal-rings.png": ((20, 160, 170), (250, 250, 250), "rings"),
    "purple-dots.jpg": ((130, 50, 190), (250, 220, 240), "dots"),
    "night-sky.png": ((250, 250, 210), (10, 20, 60), "stars"),
}
CAPTIONS = {
    "red-circle.png": "a red ball on a cream background",
    "blue-stripes.jpg": "blue and white striped fabric",
    "green-square.png": "a green square on a dark table",
    "sunset.jpg": "an orange sunset over purple hills",
    "yellow-triangle.png": "a yellow warning sign",
    "teal-rings.png": "teal rings on white paper",
}


def picture(fg, bg, shape, size=(320, 240), seed=0) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(img)
    rng = np.random.default_rng(seed)
    if shape == "circle":
        d.ellipse([w * .25, h * .15, w * .75, h * .85], fill=fg)
    elif shape == "stripes":
        for x in range(0, w, 32):
            d.rectangle([x, 0, x + 15, h], fill=fg)
    elif shape == "square":
        d.rectangle([w * .3, h * .2, w * .7, h * .8], fill=fg)
    elif shape == "gradient":
        a = np.linspace(0, 1, h)[:, None, None]
        img = Image.fromarray((np.array(fg) * (1 - a) + np.array(bg) * a).repeat(w, 1).astype(np.uint8))
        ImageDraw.Draw(img).ellipse([w * .4, h * .45, w * .6, h * .72], fill=(255, 230, 120))
    elif shape == "triangle":
        d.polygon([(w / 2, h * .1), (w * .85, h * .9), (w * .15, h * .9)], fill=fg)
    elif shape == "rings":
        for r in range(10, min(w, h) // 2, 18):
            d.ellipse([w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r], outline=fg, width=7)
    elif shape == "dots":
        for _ in range(40):
            x, y, r = rng.integers(0, w), rng.integers(0, h), rng.integers(5, 18)
            d.ellipse([x - r, y - r, x + r, y + r], fill=fg)
    else:
        for _ in range(80):
            x, y = rng.integers(0, w), rng.integers(0, h)
            d.ellipse([x - 1, y - 1, x + 2, y + 2], fill=fg)
    return img


def make_library(root, pipe_model=TINY, extras: bool = True) -> dict:
    """A library of colourful pictures, indexed; captions in a jsonl, a .txt sidecar and an XMP sidecar. With
    ``extras``: a big photo (thumbnail size), a HEIC, a name that is not UTF-8, a file outside the library (the
    secret), an indexed photo then replaced by a symlink to the secret, and an indexed photo then deleted."""
    lib = root / "photos"
    (lib / "holiday").mkdir(parents=True)
    paths = {}
    for i, (name, (fg, bg, shape)) in enumerate(PICTURES.items()):
        path = (lib / "holiday" / name) if i % 3 == 2 else (lib / name)
        picture(fg, bg, shape, seed=i).save(path, quality=92)
        paths[name] = path
    records = [{"path": str(paths[n]), "caption": CAPTIONS[n]} for n in ("red-circle.png", "blue-stripes.jpg",
                                                                            "yellow-triangle.png")]
    if extras:
        records[-1]["caption"] += " <script>alert(1)</script>"  # shown escaped
    (paths["green-square.png"].with_suffix(".txt")).write_text(CAPTIONS["green-square.png"] + "\n")
    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           '<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:description><rdf:Alt>'
           '<rdf:li xml:lang="de">Sonnenuntergang</rdf:li>'
           f'<rdf:li xml:lang="x-default">{CAPTIONS["sunset.jpg"]}</rdf:li></rdf:Alt></dc:description>'
           '</rdf:Description></rdf:RDF></x:xmpmeta>')
    with open(str(paths["sunset.jpg"]) + ".xmp", "w") as f:  # the photo.jpg.xmp naming
        f.write(xmp)
    info = {"lib": lib, "paths": paths}
    if extras:
        picture((200, 60, 90), (250, 250, 250), "circle").resize((1600, 1000)).save(lib / "big.png")
        paths["big.png"] = lib / "big.png"
        import pillow_heif

        pillow_heif.register_heif_opener()
        picture((60, 120, 220), (250, 200, 90), "square").save(lib / "phone.heic")
        paths["phone.heic"] = lib / "phone.heic"
        if UTF8_FS:
            odd = os.fsdecode(bytes(lib) + b"/caf\xe9-\xff.png")
            picture((90, 200, 120), (20, 20, 20), "dots").save(odd)
            paths["odd"] = odd
            records.append({"path": os.fsencode(odd).decode("utf-8", "replace"), "caption": "odd name caption",
                            "path_b64": base64.b64encode(os.fsencode(odd)).decode()})
        outside = root / "outside"
        outside.mkdir()
        secret = outside / "secret.png"
        picture((0, 0, 0), (255, 255, 255), "square").save(secret)
        with open(secret, "ab") as f:
            f.write(SECRET)
        info["secret"] = secret
        picture((10, 10, 10), (90, 90, 90), "circle").save(lib / "turncoat.png")
        picture((10, 200, 10), (90, 90, 90), "circle").save(lib / "gone.png")
    captions = root / "captions.jsonl"
    captions.write_text("".join(json.dumps(r) + "\n" for r in records))
    db_path = root / "library.sqlite"
    with PhotoIndex(db_path) as db:
        index_paths(db, [lib], model=str(pipe_model), recursive=True, progress=False)
        ids = {os.fsdecode(bytes(p)): i for i, p in db.db.execute("SELECT id, path FROM images WHERE row IS NOT NULL")}
    if extras:
        os.unlink(lib / "turncoat.png")
        os.symlink(info["secret"], lib / "turncoat.png")  # indexed, now a symlink out of the library
        os.unlink(lib / "gone.png")
    info.update(db=db_path, captions=captions, ids=ids)
    return info


def get(server, path, headers=None, method="GET", body=None):
    """(status, headers, body) of a raw request: the path is sent exactly as given (no normalisation)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def id_of(lib, name):
    return lib["ids"][str(lib["paths"][name])]


@pytest.fixture(scope="module")
def pipe():
    return load_retrieval(TINY)


@pytest.fixture(scope="module")
def lib(tmp_path_factory, pipe):
    return make_library(tmp_path_factory.mktemp("page"))


@pytest.fixture(scope="module")
def server(pipe, lib):
    app = create_app(pipe, index=lib["db"], captions=[lib["captions"]], model_name="tiny-itm")
    with BackgroundServer(app) as s:
        yield s


# --- pages ---------------------------------------------------------------------------------------------------------


def test_page_is_local_and_safe(server, lib):
    status, headers, body = get(server, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    html = body.decode()
    assert '<form id="search" action="/" method="get"' in html and 'name="q"' in html
    assert f"{len(lib['ids'])} photos indexed" in html
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "http" not in csp
    for asset in re.findall(r'(?:href|src)="(/static/[^"]+)"', html):
        code, h, data = get(server, asset)
        assert code == 200 and h["x-content-type-options"] == "nosniff"
        data = data.replace(b'xmlns="http://www.w3.org/2000/svg"', b"")  # a name, not an address
        assert b"http:" not in data and b"https:" not in data and b"@import" not in data and b"url(" not in data
    assert "http:" not in html and "https:" not in html and "//" not in html.replace("<!doctype", "")


def test_query_is_rendered_on_the_server(server, lib, pipe):
    status, _, body = get(server, "/?q=a+red+ball&k=100")
    html = body.decode()
    assert status == 200
    with PhotoIndex(lib["db"], create=False) as db:
        expected = search(db, "a red ball", k=100, pipeline=pipe)
    ids = [int(i) for i in re.findall(r'<img src="/thumb/(\d+)"', html)]
    refused = {str(lib["lib"] / "turncoat.png"), str(lib["lib"] / "gone.png")}  # see the security tests
    assert ids == [lib["ids"][r.path] for r in expected if r.path not in refused]
    assert len(ids) == len(lib["ids"]) - 2 and f"{len(ids)} results for \u201ca red ball\u201d" in html
    assert f'href="/image/{id_of(lib, "red-circle.png")}"' in html and f'href="/?like={ids[0]}"' in html
    # Captions: the jsonl, a .txt sidecar, an XMP sidecar's x-default, a record naming a non-UTF-8 file by path_b64
    for name in ("red-circle.png", "blue-stripes.jpg", "green-square.png", "sunset.jpg"):
        assert CAPTIONS[name] in html
    assert "Sonnenuntergang" not in html
    if UTF8_FS:
        assert "odd name caption" in html
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "teal-rings.png" in html  # no caption: the file name
    status, _, body = get(server, "/?q=%3Cb%3Ebold%3C%2Fb%3E%22%27")
    assert status == 200 and "<b>bold" not in body.decode() and "&lt;b&gt;bold&lt;/b&gt;&quot;&#x27;" in body.decode()


def test_api_search_and_more_like_this(server, lib):
    status, headers, body = get(server, "/api/search?q=a+red+ball&k=3")
    data = json.loads(body)
    assert status == 200 and headers["content-type"] == "application/json"
    assert data["query"] == "a red ball" and len(data["results"]) == 3 and data["total"] == len(lib["ids"])
    first = data["results"][0]
    assert set(first) == {"id", "score", "name", "path", "caption", "corrected", "thumb", "image", "like"}
    assert first["thumb"] == f"/thumb/{first['id']}" and first["image"] == f"/image/{first['id']}"
    scores = [r["score"] for r in data["results"]]
    assert scores == sorted(scores, reverse=True)
    target = id_of(lib, "teal-rings.png")
    data = json.loads(get(server, f"/api/search?like={target}&k=5")[2])
    assert data["like"] == target and data["results"][0]["id"] == target and len(data["results"]) == 5
    assert "teal-rings.png" in data["status"]
    html = get(server, f"/?like={target}")[2].decode()
    assert html.index(f'src="/thumb/{target}"') < html.index('src="/thumb/', html.index(f'src="/thumb/{target}"') + 5)


def test_bad_parameters_are_4xx(server):
    for query in ("k=0", "k=201", "k=abc", "like=abc", "like=-1", "like=1.5", "like=..%2F..%2Fetc%2Fpasswd",
                  "like=99999999", "q=" + "x" * 5000):
        for path in ("/api/search?", "/?"):
            status, _, body = get(server, path + query)
            assert 400 <= status < 500, (path + query, status)
    assert get(server, "/api/search")[0] == 200  # nothing asked: an empty answer


# --- thumbnails and images -----------------------------------------------------------------------------------------


def test_thumbnails_are_made_once_and_cached(server, lib, monkeypatch):
    big = id_of(lib, "big.png")
    status, headers, body = get(server, f"/thumb/{big}")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(body))
    assert max(thumb.size) == thumbnails.THUMB_SIZE <= 512 and thumb.size == (384, 240)
    cached = list((lib["db"].parent / "library.sqlite.thumbs").rglob("*.jpg"))
    assert any(p.read_bytes() == body for p in cached)
    assert not list((lib["db"].parent / "library.sqlite.thumbs").rglob("*.tmp"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cached thumbnail was made again")

    monkeypatch.setattr(thumbnails, "make_thumbnail", no_decoding)
    assert get(server, f"/thumb/{big}")[2] == body
    status, _, _ = get(server, f"/thumb/{big}", headers={"If-None-Match": headers["etag"]})
    assert status == 304


def test_thumbnail_of_heic_and_small_images(server, lib):
    for name, size in (("phone.heic", (320, 240)), ("red-circle.png", (320, 240))):
        status, _, body = get(server, f"/thumb/{id_of(lib, name)}")
        assert status == 200 and Image.open(io.BytesIO(body)).size == size  # never enlarged


def test_full_images(server, lib):
    png = lib["paths"]["red-circle.png"]
    status, headers, body = get(server, f"/image/{id_of(lib, 'red-circle.png')}")
    assert status == 200 and headers["content-type"] == "image/png" and body == png.read_bytes()
    assert "red-circle.png" in headers["content-disposition"]
    status, headers, body = get(server, f"/image/{id_of(lib, 'phone.heic')}")  # browsers don't show HEIC
    assert status == 200 and headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(body)).size == (320, 240)
    status, headers, _ = get(server, f"/image/{id_of(lib, 'sunset.jpg')}", method="HEAD")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    if UTF8_FS:
        status, headers, body = get(server, f"/image/{lib['ids'][lib['paths']['odd']]}")
        assert status == 200 and body == open(lib["paths"]["odd"], "rb").read()


# --- security --------------------------------------------------------------------------------------------------------


PATH_TRICKS = [
    "/image/../../etc/passwd", "/image/..%2F..%2Fetc%2Fpasswd", "/image/%2e%2e/%2e%2e/etc/passwd",
    "/image/%2Fetc%2Fpasswd", "/image//etc/passwd", "/thumb/..%2f..%2fetc%2fpasswd", "/thumb/%2e%2e%2fsecret.png",
    "/image/1%2F..%2F..%2Fsecret.png", "/image/1/../../secret.png", "/image/abc", "/image/-1", "/image/1.5",
    "/image/0x1", "/image/1e3", "/image/%31%2e%30", "/image/0", "/image/99999999999999999999999999",
    "/thumb/9223372036854775808", "/image/1;/etc/passwd", "/image/1%00", "/image/~root", "/image/C:%5Cwindows",
    "/static/../search_page.py", "/static/%2e%2e/search_page.py", "/static/..%2Fsearch_page.py",
    "/static/search.css/../../app.py", "/static/search.js%00.py", "/static/app.py",
]


def test_path_tricks_are_4xx(server, lib):
    secret = lib["secret"].read_bytes()
    for path in PATH_TRICKS:
        status, _, body = get(server, path)
        assert 400 <= status < 500, (path, status)
        assert SECRET not in body and secret[:64] not in body, path


def test_files_outside_the_library_are_refused(server, lib):
    turncoat = lib["ids"][str(lib["lib"] / "turncoat.png")]  # indexed; now a symlink to a file outside
    for route in ("thumb", "image"):
        status, _, body = get(server, f"/{route}/{turncoat}")
        assert status == 403 and SECRET not in body and b"outside" in body
        status, _, body = get(server, f"/{route}/{lib['ids'][str(lib['lib'] / 'gone.png')]}")
        assert status == 404
    # Search results leave them out.
    data = json.loads(get(server, "/api/search?q=x&k=200")[2])
    assert turncoat not in [r["id"] for r in data["results"]] and len(data["results"]) == len(lib["ids"]) - 2


def test_a_sidecar_symlinked_out_of_the_library_is_not_read(tmp_path, pipe):
    info = make_library(tmp_path, extras=False)
    secret = tmp_path / "secret.txt"
    secret.write_text("the secret caption")
    os.symlink(secret, info["paths"]["teal-rings.png"].with_suffix(".txt"))
    app = create_app(pipe, index=info["db"], model_name="tiny-itm")
    with BackgroundServer(app) as s:
        html = get(s, "/?q=rings&k=100")[2].decode()
    assert "the secret caption" not in html and CAPTIONS["green-square.png"] in html


# --- the API key -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(pipe, lib):
    app = create_app(pipe, index=lib["db"], captions=[lib["captions"]], model_name="tiny-itm", api_key=KEY)
    with BackgroundServer(app) as s:
        yield s


def cookie_of(headers) -> str:
    match = re.match(rf"{COOKIE}=([0-9a-f]+);", headers["set-cookie"])
    assert match and "HttpOnly" in headers["set-cookie"] and "SameSite=Strict" in headers["set-cookie"]
    return f"{COOKIE}={match.group(1)}"


def test_api_key_by_link_and_cookie(keyed, lib):
    red = id_of(lib, "red-circle.png")
    status, headers, body = get(keyed, "/?q=a+ball")
    assert status == 401 and b'<form id="login" action="/login" method="post"' in body
    for path in (f"/thumb/{red}", f"/image/{red}", "/api/search?q=x", "/v1/models"):
        assert get(keyed, path)[0] == 401
    assert get(keyed, "/?key=wrong&q=a+ball")[0] == 401
    assert get(keyed, "/static/search.css")[0] == 200  # public: the login form is styled
    status, headers, _ = get(keyed, f"/?key={KEY}&q=a+ball")
    assert status == 303 and headers["location"] == "/?q=a+ball"  # the key leaves the address bar
    cookie = cookie_of(headers)
    assert KEY not in cookie
    for path in ("/?q=a+ball", f"/thumb/{red}", f"/image/{red}", "/api/search?q=x"):
        assert get(keyed, path, headers={"Cookie": cookie})[0] == 200, path
    assert get(keyed, "/?q=a", headers={"Cookie": f"{COOKIE}=deadbeef"})[0] == 401
    # The cookie is for the page only: the model endpoints still need the bearer token.
    assert get(keyed, "/v1/models", headers={"Cookie": cookie})[0] == 401
    assert get(keyed, "/v1/embeddings", method="POST", body=b'{"input": "x"}',
               headers={"Cookie": cookie, "Content-Type": "application/json"})[0] == 401
    assert get(keyed, "/api/search?q=x", headers={"Authorization": f"Bearer {KEY}"})[0] == 200
    status, headers, _ = get(keyed, "/logout")
    assert status == 303 and "Max-Age=0" in headers["set-cookie"]


def test_api_key_by_login_form(keyed):
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert get(keyed, "/login")[0] == 200
    status, _, body = get(keyed, "/login", method="POST", body=b"key=nope&next=%2F", headers=form)
    assert status == 401 and b"Wrong key" in body
    status, headers, _ = get(keyed, "/login", method="POST", body=f"key={KEY}&next=%2F%3Fq%3Ddog".encode(),
                             headers=form)
    assert status == 303 and headers["location"] == "/?q=dog"
    assert get(keyed, "/?q=dog", headers={"Cookie": cookie_of(headers)})[0] == 200
    status, headers, _ = get(keyed, "/login", method="POST", body=f"key={KEY}&next=//evil.example".encode(),
                             headers=form)
    assert status == 303 and headers["location"] == "/"
    assert get(keyed, "/login", method="POST", body=b"key=" + b"x" * 10000, headers=form)[0] == 413
    assert [safe_next(u) for u in ("/?q=1", "//x", "/\\x", "http://x", "/a\nb")] == ["/?q=1", "/", "/", "/", "/"]


# --- setup -----------------------------------------------------------------------------------------------------------


def test_needs_a_retrieval_checkpoint_and_an_index(lib, tmp_path):
    from mlx_blip2.pipelines import load

    with pytest.raises(ValueError, match="retrieval checkpoint"):
        create_app(load(FIXTURES / "tiny-blip2-opt"), index=lib["db"])
    with pytest.raises(FileNotFoundError):
        create_app(load_retrieval(TINY), index=tmp_path / "missing.sqlite")


def test_command_line(monkeypatch, lib):
    from mlx_blip2.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--index", str(lib["db"]), "--captions", str(lib["captions"])])
    assert args.host == "127.0.0.1" and args.index == str(lib["db"]) and args.captions == [str(lib["captions"])]
    served = {}

    def fake_run(app, host, port, **kwargs):
        served.update(app=app, host=host, port=port)

    import uvicorn

    monkeypatch.setattr(uvicorn, "run", fake_run)
    assert main(["serve", "--index", str(lib["db"]), "--port", "8123"]) == 0  # the model: the index's
    assert served["host"] == "127.0.0.1" and served["port"] == 8123
    assert served["app"].state.search_page.index.model == str(TINY)
    served["app"].state.search_page.close()
    assert main(["search", "--web", "--db", str(lib["db"]), "--captions", str(lib["captions"])]) == 0
    assert served["host"] == "127.0.0.1" and served["port"] == 8080
    assert served["app"].state.pipeline.kind == "retrieval"
    served["app"].state.search_page.close()
    assert main(["serve", "--index", str(lib["db"].parent / "nope.sqlite")]) == 2


def test_thumbnail_cache_keys_follow_the_file(tmp_path):
    a = thumbnails.thumb_key("/p/a.jpg", 10, 1, 384)
    assert a != thumbnails.thumb_key("/p/a.jpg", 10, 2, 384) != thumbnails.thumb_key("/p/b.jpg", 10, 1, 384)
    assert len(a) == 40 and a == hashlib.sha256(b"/p/a.jpg" + b"\x0010\x001\x00384").hexdigest()[:40]
    with pytest.raises(ValueError):
        thumbnails.ThumbnailCache(tmp_path / "t", thumb_size=1024)
