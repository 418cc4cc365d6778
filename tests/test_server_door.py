"""The server's door (mlx_blip2/server/door.py) over raw HTTP: a foreign Host (DNS rebinding), an empty or missing
Host, and cross-site requests read nothing from any route; the server's own names and pages, and what
``--allowed-host`` / ``--cors-origin`` open, keep working. The browser's side is in test_server_door_browser.py."""

import base64
import http.client
import io
import json
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mlx_blip2.server import missing_server_packages  # noqa: E402

if missing_server_packages():
    pytest.skip(f"the server extra is not installed ({', '.join(missing_server_packages())})",
                allow_module_level=True)

from PIL import Image  # noqa: E402
from test_search_page import CAPTIONS, TINY, make_library  # noqa: E402

from mlx_blip2.cli import build_parser  # noqa: E402
from mlx_blip2.cli.serve import server_settings  # noqa: E402
from mlx_blip2.pipelines.retrieval import load_retrieval  # noqa: E402
from mlx_blip2.server import BackgroundServer, create_app  # noqa: E402
from mlx_blip2.server.door import Door, host_name  # noqa: E402
from mlx_blip2.server.page_auth import COOKIE  # noqa: E402

KEY = "door-key-7"


def raw(port: int, method: str, path: str, headers: dict, body: bytes | None = None):
    """(status, headers, body) of a request carrying exactly ``headers`` (Host included, or left out)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def http10_without_host(port: int, path: str) -> bytes:
    """An HTTP/1.0 request, which may leave Host out (HTTP/1.1 servers refuse that already)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def png_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def pipe():
    return load_retrieval(TINY)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return make_library(tmp_path_factory.mktemp("door"), extras=False)


@pytest.fixture(scope="module")
def server(pipe, lib):
    app = create_app(pipe, index=lib["db"], captions=[lib["captions"]], model_name="tiny-itm",
                     allowed_hosts=["photos.lan"], cors_origins=["http://localhost:3000"])
    with BackgroundServer(app) as s:
        yield s


def routes(lib) -> list[tuple[str, str, bytes | None]]:
    """Every kind of route: the page, its JSON, photos, the API (reading and running the model), the docs."""
    some_id = next(iter(lib["ids"].values()))
    embed = json.dumps({"input": ["a red ball"], "model": "tiny-itm"}).encode()
    return [("GET", "/", None), ("GET", "/?q=red+ball", None), ("GET", "/api/search?q=red+ball", None),
            ("GET", f"/image/{some_id}", None), ("GET", f"/thumb/{some_id}", None),
            ("GET", "/?like=" + str(some_id), None), ("GET", "/v1/models", None), ("GET", "/docs", None),
            ("GET", "/openapi.json", None), ("POST", "/v1/embeddings", embed),
            ("POST", "/v1/match", json.dumps({"image": png_b64(), "texts": ["a red ball"]}).encode())]


def reads_nothing(body: bytes) -> None:
    """A refusal: a short JSON error, no caption, no image, no embedding, no model name."""
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert len(body) < 600 and b"tiny-itm" not in body and b"embedding" not in body
    assert not any(c.encode() in body for c in CAPTIONS.values())


def test_the_servers_own_names_reach_every_route(server, lib):
    for host in ("127.0.0.1", "localhost", "[::1]", "photos.lan", "LOCALHOST"):
        for method, path, body in routes(lib):
            headers = {"Host": f"{host}:{server.port}", "Content-Type": "application/json"}
            code, _, _ = raw(server.port, method, path, headers, body)
            assert code == 200, (host, path, code)
    assert raw(server.port, "GET", "/v1/models", {"Host": "localhost"})[0] == 200  # no port


@pytest.mark.parametrize("host", ["attacker.example", "127.0.0.1.attacker.example", "localhost.evil", "evil.com.",
                                  "[::2]", "192.0.2.1"])
def test_a_foreign_host_reads_nothing_on_any_route(server, lib, host):
    for method, path, body in routes(lib) + [("GET", "/health", None), ("GET", "/static/search.js", None)]:
        code, headers, out = raw(server.port, method, path, {"Host": f"{host}:{server.port}",
                                                             "Content-Type": "application/json"}, body)
        assert code == 403, (host, path, code)
        assert "access-control-allow-origin" not in headers
        reads_nothing(out)
    message = json.loads(raw(server.port, "GET", "/", {"Host": f"{host}:{server.port}"})[2])["error"]["message"]
    assert "--allowed-host" in message


def test_an_empty_or_missing_host_is_refused(server, lib):
    for method, path, body in routes(lib):
        code, _, out = raw(server.port, method, path, {"Host": f":{server.port}",
                                                       "Content-Type": "application/json"}, body)
        assert code == 400, (path, code)
        reads_nothing(out)
        assert raw(server.port, method, path, {"Host": "", "Content-Type": "application/json"}, body)[0] == 400
    for path in ("/", "/v1/models", "/openapi.json", f"/image/{next(iter(lib['ids'].values()))}"):
        answer = http10_without_host(server.port, path)
        assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
        assert b"tiny-itm" not in answer and b"<html" not in answer.lower()


@pytest.mark.parametrize("headers", [{"Origin": "http://attacker.example"}, {"Origin": "null"},
                                     {"Origin": "http://127.0.0.1:1"}, {"Origin": "https://localhost:3000"},
                                     {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                                     {"Sec-Fetch-Site": "cross-site", "Referer": "http://attacker.example/x"}])
def test_cross_site_requests_read_nothing(server, lib, headers):
    for method, path, body in routes(lib):
        code, out_headers, out = raw(server.port, method, path, {"Host": f"127.0.0.1:{server.port}",
                                                                 "Content-Type": "application/json", **headers}, body)
        assert code == 403, (headers, path, code)
        assert "access-control-allow-origin" not in out_headers
        reads_nothing(out)


def test_the_pages_own_requests_and_liveness_pass(server, lib):
    own = {"Host": f"127.0.0.1:{server.port}", "Origin": f"http://127.0.0.1:{server.port}",
           "Content-Type": "application/json"}
    for method, path, body in routes(lib):
        assert raw(server.port, method, path, own, body)[0] == 200, path
        assert raw(server.port, method, path, {**own, "Sec-Fetch-Site": "same-origin"}, body)[0] == 200, path
    typed = {"Host": f"localhost:{server.port}", "Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate"}
    assert raw(server.port, "GET", "/?q=red", typed)[0] == 200
    # Liveness and the page's static files hold nothing private.
    for path in ("/health", "/static/search.css"):
        assert raw(server.port, "GET", path, {"Host": f"127.0.0.1:{server.port}",
                                              "Sec-Fetch-Site": "cross-site"})[0] == 200


def test_cors_origin_opens_the_api_to_one_web_app(server, lib):
    app_origin = {"Host": f"127.0.0.1:{server.port}", "Origin": "http://localhost:3000"}
    code, headers, body = raw(server.port, "POST", "/v1/embeddings", {**app_origin, "Content-Type":
                                                                      "application/json"}, routes(lib)[9][2])
    assert code == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"
    assert len(json.loads(body)["data"][0]["embedding"]) > 0
    code, headers, _ = raw(server.port, "OPTIONS", "/v1/embeddings", {
        **app_origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert code == 204 and headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "Content-Type" in headers["access-control-allow-headers"]
    # The same app's <img> loads carry no Origin; its address comes as the referrer.
    some_id = next(iter(lib["ids"].values()))
    code, _, _ = raw(server.port, "GET", f"/thumb/{some_id}", {"Host": f"127.0.0.1:{server.port}",
                                                                "Sec-Fetch-Site": "same-site",
                                                                "Referer": "http://localhost:3000/"})
    assert code == 200
    # Another origin's preflight gets no CORS headers.
    code, headers, _ = raw(server.port, "OPTIONS", "/v1/embeddings", {
        "Host": f"127.0.0.1:{server.port}", "Origin": "http://localhost:4000", "Access-Control-Request-Method": "POST"})
    assert code == 403 and "access-control-allow-origin" not in headers


def test_the_door_answers_before_the_api_key(pipe, lib):
    app = create_app(pipe, index=lib["db"], captions=[lib["captions"]], model_name="tiny-itm", api_key=KEY)
    with BackgroundServer(app) as s:
        bearer = {"Authorization": f"Bearer {KEY}"}
        code, _, out = raw(s.port, "GET", "/v1/models", {"Host": "attacker.example", **bearer})
        assert code == 403
        reads_nothing(out)
        code, headers, _ = raw(s.port, "GET", f"/?key={KEY}", {"Host": f"127.0.0.1:{s.port}"})
        assert code == 303
        cookie = headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        value = cookie.split(";")[0]
        # The cookie opens the page on the server's own name only, and not to another site's request.
        assert raw(s.port, "GET", "/?q=red", {"Host": f"127.0.0.1:{s.port}", "Cookie": value})[0] == 200
        assert raw(s.port, "GET", "/?q=red", {"Host": "attacker.example", "Cookie": value})[0] == 403
        assert raw(s.port, "GET", "/?q=red", {"Host": f"127.0.0.1:{s.port}", "Cookie": value,
                                              "Sec-Fetch-Site": "cross-site"})[0] == 403
        # A cross-site form cannot log in either (login CSRF).
        code, headers, _ = raw(s.port, "POST", "/login", {"Host": f"127.0.0.1:{s.port}",
                                                          "Origin": "http://attacker.example",
                                                          "Content-Type": "application/x-www-form-urlencoded"},
                               f"key={KEY}&next=/".encode())
        assert code == 403 and "set-cookie" not in headers


def test_door_rules():
    door = Door(["Photos.LAN", "[fe80::1]", "proxy.example:8443"], ["http://localhost:3000/"])
    for host in ("127.0.0.1:80", "localhost", "[::1]:8080", "photos.lan:1", "[fe80::1]:9", "proxy.example",
                 "localhost.:8080"):
        assert door.host_refusal({"host": host}, "127.0.0.1") is None, host
    for host in ("evil.com", "127.0.0.2", "photos.lan.evil.com", "localhost@evil.com"):
        assert door.host_refusal({"host": host}, "127.0.0.1").status == 403, host
    for host in (":8080", "[::1", " "):
        assert door.host_refusal({"host": host}, "127.0.0.1").status == 400, host
    assert door.host_refusal({}, "127.0.0.1").status == 400
    # The address a connection arrived on (e.g. --host 0.0.0.0 reached at the LAN address) is the server's own.
    assert door.host_refusal({"host": "192.168.1.20:8080"}, "192.168.1.20") is None
    assert door.host_refusal({"host": "192.168.1.20:8080"}, "127.0.0.1").status == 403
    assert Door(["*"]).host_refusal({"host": "anything.example"}, None) is None
    assert door.cors_origin({"origin": "http://LOCALHOST:3000"}) == "http://localhost:3000"
    assert host_name("[::1]:80") == "::1" and host_name("Example.COM.:80") == "example.com"
    with pytest.raises(ValueError, match="--cors-origin 'localhost:3000'"):
        Door((), ["localhost:3000"])
    with pytest.raises(ValueError, match="http://a.example/path"):
        Door((), ["http://a.example/path"])


def test_serve_flags_open_the_door_deliberately(capsys):
    args = build_parser().parse_args(["serve", "--allowed-host", "photos.lan", "--allowed-host", "nas.local",
                                      "--cors-origin", "http://localhost:3000"])
    settings = server_settings(args)
    assert settings["allowed_hosts"] == ("photos.lan", "nas.local")
    assert settings["cors_origins"] == ("http://localhost:3000",)
    web = build_parser().parse_args(["search", "--web", "--db", "x.sqlite", "--allowed-host", "photos.lan"])
    assert web.allowed_host == ["photos.lan"]
    from mlx_blip2.cli import main

    assert main(["serve", "--cors-origin", "localhost:3000", "-m", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--cors-origin 'localhost:3000'" in err
