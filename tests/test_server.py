"""The HTTP server (mlx_blip2/server/), end to end on loopback with the tiny checkpoints.

Each server runs in-process (uvicorn on a free 127.0.0.1 port, on a thread); requests are raw HTTP (http.client) and,
when installed, the `openai` client. Nothing leaves the machine.
"""

import asyncio
import base64
import http.client
import http.server
import io
import json
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image
from reference_cases import make_images

from mlx_blip2.generation import generate as G
from mlx_blip2.pipelines.engine import Engine, Row
from mlx_blip2.generation.recipes import CAPTION_DEFAULTS, VQA_DEFAULTS, resolve_recipe
from mlx_blip2.pipelines import load
from mlx_blip2.server import missing_server_packages

if missing_server_packages():  # the web stack is the `server` extra
    pytest.skip(f"the server extra is not installed ({', '.join(missing_server_packages())})",
                allow_module_level=True)

from mlx_blip2.pipelines.engine import Completion, ContextLengthError  # noqa: E402
from mlx_blip2.generation.options import OPTION_FIELDS, PUBLIC_OPTIONS  # noqa: E402
from mlx_blip2.images import available_formats  # noqa: E402
from mlx_blip2.server import BackgroundServer, create_app  # noqa: E402
from mlx_blip2.server.auth import APIKeyMiddleware, authorized, given_key  # noqa: E402
from mlx_blip2.server.config import ServerConfig  # noqa: E402
from mlx_blip2.server.errors import APIError, from_worker  # noqa: E402
from mlx_blip2.server.images import decode_image, image_bytes_from_string, image_sources, load_image  # noqa: E402
from mlx_blip2.server.openai import (ChatIds, StreamText, chat_prompt, chunk, completion_body,  # noqa: E402
                                     embeddings_body, sse)
from mlx_blip2.server.schemas import (build_schemas, generation_overrides, request_names,  # noqa: E402
                                      resolve_options, validate)
from mlx_blip2.server.worker import Job, ModelWorker, generation_key  # noqa: E402

TINY = FIXTURES / "tiny-blip2-opt"
TINY_ITM = FIXTURES / "tiny-blip2-itm"
KEY = "test-key-123"


# --- helpers -------------------------------------------------------------------------------------------------------


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    """fields {name: str | [str]}, files {name: bytes | [bytes]} -> (body, content type)."""
    boundary = "----mlxblip2test7d2f"
    out = []
    for name, values in fields.items():
        for v in values if isinstance(values, list) else [values]:
            out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{v}\r\n'.encode())
    for name, blobs in files.items():
        for i, blob in enumerate(blobs if isinstance(blobs, list) else [blobs]):
            out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="f{i}.png"\r\n'
                       "Content-Type: image/png\r\n\r\n".encode() + blob + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def request(server, method, path, body=None, json_body=None, headers=None, timeout=60):
    """(status, headers, parsed JSON or raw bytes)."""
    headers = dict(headers or {})
    if json_body is not None:
        body = json.dumps(json_body).encode()
        headers.setdefault("Content-Type", "application/json")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        raw = r.read()
        ctype = r.getheader("content-type", "")
        return r.status, dict(r.getheaders()), json.loads(raw) if "json" in ctype else raw
    finally:
        conn.close()


def post(server, path, payload, **kw):
    return request(server, "POST", path, json_body=payload, **kw)


def post_form(server, path, fields=None, files=None, **kw):
    body, ctype = multipart(fields or {}, files or {})
    return request(server, "POST", path, body=body, headers={"Content-Type": ctype, **kw.pop("headers", {})}, **kw)


def assert_error(result, status, *words):
    code, headers, body = result
    assert code == status, (code, body)
    assert "json" in headers.get("content-type", ""), headers
    message = body["error"]["message"]
    for w in words:
        assert w.lower() in message.lower(), message
    return message


def chat_payload(image, text=None, **kw):
    content = [{"type": "image_url", "image_url": {"url": data_url(image)}}]
    if text is not None:
        content.insert(0, {"type": "text", "text": text})
    return {"messages": [{"role": "user", "content": content}], **kw}


def read_sse(server, payload, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(payload),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    events = [line[6:] for line in r.read().decode().split("\n") if line.startswith("data: ")]
    conn.close()
    return events


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height but holds almost nothing (a decompression bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


# --- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    return load(TINY)


@pytest.fixture(scope="module")
def images():
    return make_images()


def batching_server(pipe, model_name: str):
    """A module's shared server (a generator for fixtures), batching up to 8 rows in a 20 ms window."""
    app = create_app(pipe, model_name=model_name, max_batch=8, batch_window=0.02)
    with BackgroundServer(app) as s:
        s.app = app
        yield s


@pytest.fixture(scope="module")
def server(pipe):
    yield from batching_server(pipe, "tiny-blip2-opt")


@pytest.fixture(scope="module")
def retrieval():
    if not (TINY_ITM / "model.safetensors").is_file():
        pytest.skip("tiny-blip2-itm fixture not there")
    return load(TINY_ITM)


@pytest.fixture(scope="module")
def retrieval_server(retrieval):
    yield from batching_server(retrieval, "tiny-blip2-itm")


def serve(pipe, **limits):
    app = create_app(pipe, model_name="tiny", **limits)
    s = BackgroundServer(app).start()
    s.app = app
    return s


# --- endpoints -----------------------------------------------------------------------------------------------------


def test_health_and_models(server):
    code, _, body = request(server, "GET", "/health")
    assert code == 200 and body["status"] == "ok" and body["model"] == "tiny-blip2-opt"
    assert body["task"] == "generation"
    code, _, body = request(server, "GET", "/v1/models")
    assert code == 200 and body["object"] == "list" and body["data"][0]["id"] == "tiny-blip2-opt"


def test_caption_json_and_multipart_match_the_pipeline(server, pipe, images):
    image = images[0]
    b64 = base64.b64encode(png_bytes(image)).decode()
    expected = pipe.caption(image)
    for payload in ({"image": b64}, {"image": data_url(image)}, {"image": data_url(image), "model": "tiny-blip2-opt"}):
        code, _, body = post(server, "/v1/caption", payload)
        assert code == 200 and body["caption"] == expected
    code, _, body = post_form(server, "/v1/caption", files={"image": png_bytes(image)})
    assert code == 200 and body["caption"] == expected
    # A prompt and options (form fields are typed by the option they set).
    code, _, body = post_form(server, "/v1/caption", {"prompt": "a photo of", "num_beams": "1",
                                                      "max_new_tokens": "6"}, {"image": png_bytes(image)})
    assert code == 200 and body["caption"] == pipe.caption(image, prompt="a photo of", num_beams=1, max_new_tokens=6)
    # JPEG, sampling with a seed, and several sequences from beam search.
    jpeg = png_bytes(images[2], "JPEG")
    code, _, body = post(server, "/v1/caption", {"image": base64.b64encode(jpeg).decode(), "temperature": 0.8,
                                                 "seed": 3, "max_new_tokens": 6})
    expected = pipe.caption(Image.open(io.BytesIO(jpeg)), temperature=0.8, seed=3, max_new_tokens=6)
    assert code == 200 and body["caption"] == expected
    code, _, body = post(server, "/v1/caption", {"image": data_url(image), "num_beams": 3,
                                                 "num_return_sequences": 2, "max_new_tokens": 8})
    assert code == 200
    options = resolve_recipe(CAPTION_DEFAULTS, {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 8})
    assert body["captions"] == [c.text for c in pipe.engine.generate([Row(image=image)], options)[0]]
    assert body["caption"] == body["captions"][0]


def test_an_unknown_model_is_404_model_not_found(server, retrieval_server, images):
    image = data_url(images[0])
    for srv, path, payload in [(server, "/v1/chat/completions", chat_payload(images[0], model="gpt-4o")),
                               (server, "/v1/caption", {"image": image, "model": "gpt-4o"}),
                               (server, "/v1/ask", {"image": image, "question": "what?", "model": "tiny"}),
                               (retrieval_server, "/v1/embeddings", {"input": "a cat", "model": "text-embedding-3"}),
                               (retrieval_server, "/v1/match", {"image": image, "texts": "a", "model": "x"})]:
        code, _, body = post(srv, path, payload)
        assert code == 404, (path, body)
        error = body["error"]
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert error["type"] == "invalid_request_error" and payload["model"] in error["message"]
    # The name /v1/models lists, or its last path component, is this model.
    app = create_app(pipe_of(server), model_name=str(TINY))
    with BackgroundServer(app) as s:
        assert request(s, "GET", "/v1/models")[2]["data"][0]["id"] == str(TINY)
        for name in (str(TINY), "tiny-blip2-opt"):
            assert post(s, "/v1/caption", {"image": image, "model": name, "max_new_tokens": 3})[0] == 200


def pipe_of(server):
    return server.app.state.pipeline


def test_ask_matches_the_pipeline(server, pipe, images):
    image = images[1]
    code, _, body = post(server, "/v1/ask", {"image": data_url(image), "question": "what is in the picture?"})
    assert code == 200 and body["answer"] == pipe.ask(image, "what is in the picture?")
    questions = ["what is in the picture?", "how many dogs are there?"]
    code, _, body = post_form(server, "/v1/ask", {"question": questions, "max_new_tokens": "5"},
                              {"image": png_bytes(image)})
    assert code == 200 and body["answers"] == pipe.ask(image, questions, max_new_tokens=5)
    code, _, body = post(server, "/v1/ask", {"image": data_url(image), "question": "what?", "template": "Q: {} A:"})
    assert code == 200 and body["answer"] == pipe.ask(image, "what?", template="Q: {} A:")


def test_chat_completions(server, pipe, images):
    image = images[0]
    code, _, body = post(server, "/v1/chat/completions", chat_payload(image, "what is in the picture?"))
    assert code == 200 and body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": pipe.ask(image, "what is in the picture?")}
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["prompt_tokens"] > 8
    # No text: a caption. Options map from OpenAI's names.
    code, _, body = post(server, "/v1/chat/completions", chat_payload(image, max_tokens=7))
    assert code == 200 and body["choices"][0]["message"]["content"] == pipe.caption(image, max_new_tokens=7)
    # A conversation becomes BLIP-2's "Question: ... Answer: ..." prompt.
    payload = chat_payload(image, "what is it?")
    payload["messages"] += [{"role": "assistant", "content": "a cat", "refusal": None, "tool_calls": []},
                            {"role": "user", "content": "what colour?"}]
    payload["messages"].insert(0, {"role": "system", "content": "be brief"})
    code, _, body = post(server, "/v1/chat/completions", payload)
    expected = pipe.caption(image, prompt="Question: what is it? Answer: a cat Question: what colour? Answer:",
                            **VQA_DEFAULTS)
    assert code == 200 and body["choices"][0]["message"]["content"] == expected


def test_chat_streaming(server, pipe, images):
    image = images[2]
    events = read_sse(server, chat_payload(image, "what?", stream=True, max_tokens=6,
                                           stream_options={"include_usage": True}))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text.strip() == pipe.ask(image, "what?", num_beams=1, max_new_tokens=6)
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    # Streaming and beams do not mix: a JSON error before any event.
    assert_error(post(server, "/v1/chat/completions", chat_payload(image, "what?", stream=True, num_beams=3)),
                 400, "num_beams")


def test_openai_client(pipe, images):
    openai = pytest.importorskip("openai")
    s = serve(pipe, api_key=KEY)
    try:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key=KEY, max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["tiny"]
        content = [{"type": "text", "text": "what is in the picture?"},
                   {"type": "image_url", "image_url": {"url": data_url(images[0])}}]
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}])
        assert reply.choices[0].message.content == pipe.ask(images[0], "what is in the picture?")
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                                stream=True, max_tokens=5, extra_body={"top_k": 1})
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text.strip() == pipe.ask(images[0], "what is in the picture?", top_k=1, max_new_tokens=5)
        with pytest.raises(openai.BadRequestError, match="top_p"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], top_p=2)
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": content}])
        assert e.value.code == "model_not_found" and e.value.param == "model"
        bad = openai.OpenAI(base_url=f"{s.url}/v1", api_key="wrong", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    finally:
        s.stop()


def test_api_key_guards_every_endpoint_but_health(pipe, images):
    s = serve(pipe, api_key=KEY)
    try:
        assert request(s, "GET", "/health")[0] == 200
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/caption"), ("POST", "/v1/ask"),
                             ("POST", "/v1/chat/completions"), ("POST", "/v1/match"), ("POST", "/v1/embeddings"),
                             ("GET", "/nope")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}):
                assert_error(request(s, method, path, json_body={} if method == "POST" else None, headers=headers),
                             401, "API key")
        assert request(s, "GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})[0] == 200
        code, _, body = post(s, "/v1/caption", {"image": data_url(images[0])}, headers={"X-API-Key": KEY})
        assert code == 200 and body["caption"] == pipe.caption(images[0])
    finally:
        s.stop()


# --- batching ------------------------------------------------------------------------------------------------------


def test_concurrent_burst_equals_sequential(server, pipe, images):
    """16 clients at once: the results are the ones each request gets alone, and requests shared model calls."""
    questions = ["what is in the picture?", "how many dogs are there?", "what colour is it?", "why?"]
    jobs = []
    for i in range(16):
        image = images[i % 3]
        if i % 2:
            jobs.append(("/v1/ask", {"image": data_url(image), "question": questions[i % 4]}))
        else:
            jobs.append(("/v1/caption", {"image": data_url(image), **({"prompt": "a photo of"} if i % 4 else {})}))
    jobs.append(("/v1/caption", {"image": data_url(images[0]), "num_beams": 1, "max_new_tokens": 5}))
    jobs.append(("/v1/caption", {"image": data_url(images[1]), "num_beams": 1, "max_new_tokens": 5}))
    sequential = [post(server, path, payload) for path, payload in jobs]
    assert all(code == 200 for code, _, _ in sequential)
    before = dict(server.app.state.worker.stats)
    with ThreadPoolExecutor(len(jobs)) as ex:
        concurrent = list(ex.map(lambda job: post(server, *job), jobs))
    assert [b for _, _, b in concurrent] == [b for _, _, b in sequential]
    stats = server.app.state.worker.stats
    assert stats["jobs"] - before["jobs"] == len(jobs)
    assert stats["batches"] - before["batches"] < len(jobs)  # some requests shared a model call
    assert stats["largest_batch"] > 1
    # And they agree with the Python API.
    assert sequential[1][2]["answer"] == pipe.ask(images[1], questions[1])
    assert sequential[0][2]["caption"] == pipe.caption(images[0])
    assert sequential[2][2]["caption"] == pipe.caption(images[2], prompt="a photo of")


# --- bad input -----------------------------------------------------------------------------------------------------


def test_bad_images_are_4xx(server, images):
    good = png_bytes(images[0])
    cases = [
        ({"image": base64.b64encode(good[:60] + b"\0" * 100).decode()}, 400, "image"),  # corrupt
        ({"image": base64.b64encode(good[: len(good) // 2]).decode()}, 400, "truncated"),  # truncated
        ({"image": ""}, 400, "empty"),
        ({"image": base64.b64encode(b"just some text, not an image").decode()}, 400, "not an image"),
        ({"image": "data:text/plain;base64,aGVsbG8="}, 400, "not an image"),
        ({"image": "data:image/png,rawdata"}, 400, "base64"),
        ({"image": "%%% not base64 %%%"}, 400, "base64"),
        ({"image": 42}, 400, "image"),
        ({"image": ["a", "b"]}, 400, "image"),
        ({}, 400, "required"),
        ({"image": base64.b64encode(png_header_only(8000, 8000)).decode()}, 413, "megapixels"),  # 64 MP > 50 MP
        ({"image": base64.b64encode(png_header_only(20000, 20000)).decode()}, 413, "image"),  # PIL's bomb check
    ]
    for payload, status, word in cases:
        assert_error(post(server, "/v1/caption", payload), status, word)
    # Uploads: empty, not an image, two images where one is expected.
    assert_error(post_form(server, "/v1/caption", files={"image": b""}), 400, "empty")
    assert_error(post_form(server, "/v1/caption", files={"image": b"GIF89a garbage"}), 400, "image")
    assert_error(post_form(server, "/v1/caption", files={"image": [good, good]}), 400, "one image")
    assert_error(post_form(server, "/v1/caption", {"image": "x"}, {"image": good}), 400, "image")
    assert_error(post_form(server, "/v1/caption", files={"prompt": good, "image": good}), 400, "prompt")
    # The chat endpoint's images too.
    payload = chat_payload(images[0], "what?")
    payload["messages"][0]["content"][1]["image_url"]["url"] = "data:image/png;base64," + \
        base64.b64encode(b"nope").decode()
    assert_error(post(server, "/v1/chat/completions", payload), 400, "image")
    assert request(server, "GET", "/health")[0] == 200


def test_size_limits(pipe, images):
    s = serve(pipe, max_upload_bytes=20_000, max_pixels=4096)
    try:
        noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 120, 3), dtype=np.uint8))
        big = png_bytes(noise)  # ~43 kB
        assert len(big) > 20_000
        assert_error(post_form(s, "/v1/caption", files={"image": big}), 413, "kB")
        assert_error(post(s, "/v1/caption", {"image": base64.b64encode(big).decode()}), 413, "kB")
        flat = Image.new("RGB", (100, 100), (200, 30, 30))  # a small file, but 10,000 pixels > 4096
        assert_error(post(s, "/v1/caption", {"image": data_url(flat)}), 413, "megapixels")
        assert post(s, "/v1/caption", {"image": data_url(images[0].resize((60, 40)))})[0] == 200
        # A body far over the limit is refused from its Content-Length, before it is read.
        assert_error(request(s, "POST", "/v1/caption", body=b"x" * 2_000_000,
                             headers={"Content-Type": "application/json"}), 413, "MB")
    finally:
        s.stop()


def test_too_many_pixels_is_one_message_naming_the_flag(server):
    """Past --max-pixels, or past Pillow's own decompression-bomb limit: the same 413, naming the setting."""
    import re

    messages = []
    for side in (8000, 20000):  # 64 MP (our check, from the header); 400 MP (Pillow's bomb check, while opening)
        payload = {"image": base64.b64encode(png_header_only(side, side)).decode()}
        messages.append(assert_error(post(server, "/v1/caption", payload), 413, "--max-pixels"))
    for message, megapixels in zip(messages, ("64.0", "400.0")):
        assert re.fullmatch(rf"'image'( \(\d+x\d+\))? is {megapixels} megapixels; the limit is 50 megapixels "
                            r"\(this server's --max-pixels\)", message), message
    upload = assert_error(post(serve_limits := serve(server.app.state.pipeline, max_upload_bytes=20),
                               "/v1/caption", {"image": base64.b64encode(png_header_only(20, 20)).decode()}), 413)
    serve_limits.stop()
    assert upload.endswith("(this server's --max-upload-mb)"), upload


def test_bad_requests_are_4xx(server, images):
    image = data_url(images[0])
    assert_error(request(server, "POST", "/v1/caption", body=b"{not json",
                         headers={"Content-Type": "application/json"}), 400, "malformed JSON")
    assert_error(request(server, "POST", "/v1/caption", body=b"",
                         headers={"Content-Type": "application/json"}), 400, "empty")
    assert_error(request(server, "POST", "/v1/caption", body=b"[1, 2]",
                         headers={"Content-Type": "application/json"}), 400, "object")
    assert_error(request(server, "POST", "/v1/caption", body=b"\xff\xfe\x00garbage",
                         headers={"Content-Type": "application/json"}), 400, "JSON")
    assert_error(request(server, "POST", "/v1/caption", body=b"hello", headers={"Content-Type": "text/plain"}),
                 415, "application/json")
    assert_error(request(server, "POST", "/v1/caption", body=b"--x\r\nbroken",
                         headers={"Content-Type": "multipart/form-data; boundary=x"}), 400)
    assert_error(post(server, "/v1/caption", {"image": image, "colour": "red"}), 400, "unknown field 'colour'")
    assert_error(post(server, "/v1/ask", {"image": image}), 400, "question", "required")
    assert_error(post(server, "/v1/ask", {"image": image, "question": []}), 400, "empty")
    assert_error(post(server, "/v1/ask", {"image": image, "question": [1]}), 400, "string")
    assert_error(post(server, "/v1/ask", {"image": image, "question": "q", "template": "no slot"}), 400, "template")
    assert_error(post(server, "/v1/caption", {"image": image, "prompt": "x" * 100_000}), 400, "characters")
    out_of_range = [
        ({"num_beams": 0}, "num_beams"), ({"num_beams": 1000}, "num_beams"), ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 10**9}, "max_new_tokens"), ({"top_p": 1.5}, "top_p"), ({"top_p": 0}, "top_p"),
        ({"temperature": -1}, "temperature"), ({"min_p": 2}, "min_p"), ({"top_k": -3}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"), ({"seed": -1}, "seed"), ({"num_beams": "five"}, "num_beams"),
        ({"num_beams": 2.5}, "num_beams"), ({"do_sample": "yes"}, "do_sample"), ({"max_new_tokens": True}, "max_new"),
        ({"temperature": float("nan")}, "temperature"), ({"length_penalty": float("inf")}, "length_penalty"),
        ({"temperature": 0.7, "num_beams": 3}, "beam"), ({"num_return_sequences": 6}, "num_return_sequences"),
        ({"min_new_tokens": 9, "max_new_tokens": 3}, "min_new_tokens"),
        ({"max_new_tokens": 500, "num_beams": 1}, "positions"),  # past the tiny model's 128 positions
    ]
    for options, word in out_of_range:
        assert_error(post(server, "/v1/caption", {"image": image, **options}), 400, word)
    assert_error(post_form(server, "/v1/caption", {"num_beams": "lots"}, {"image": png_bytes(images[0])}), 400,
                 "num_beams")
    # Chat: unknown fields, unsupported options, no image, two images, bad structure.
    assert_error(post(server, "/v1/chat/completions", chat_payload(images[0], "hi", tools=[])), 400, "tools")
    assert_error(post(server, "/v1/chat/completions", chat_payload(images[0], "hi", stop=["."])), 400, "stop")
    assert_error(post(server, "/v1/chat/completions", chat_payload(images[0], "hi", n=0)), 400, "'n'")
    assert_error(post(server, "/v1/chat/completions", chat_payload(images[0], "hi", max_tokens=-1)), 400,
                 "max_tokens")
    assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "user",
                                                                                 "content": "hi"}]}), 400, "image")
    two = chat_payload(images[0], "hi")
    two["messages"][0]["content"].append(two["messages"][0]["content"][1])
    assert_error(post(server, "/v1/chat/completions", two), 400, "exactly one image")
    assert_error(post(server, "/v1/chat/completions", {"messages": "hi"}), 400, "messages")
    assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "robot"}]}), 400, "role")
    # Unknown endpoints and methods get JSON errors too; the retrieval endpoints need a retrieval model.
    assert_error(request(server, "GET", "/v1/nothing"), 404, "no such endpoint")
    assert_error(request(server, "GET", "/v1/caption"), 405, "GET")
    assert_error(post(server, "/v1/match", {"image": image, "texts": ["a"]}), 400, "retrieval")
    assert_error(post(server, "/v1/embeddings", {"input": "a"}), 400, "retrieval")
    assert request(server, "GET", "/health")[0] == 200


def test_random_bad_input_never_500(server, images):
    """Seeded garbage (bodies, content types, field values, methods) on every endpoint: 4xx or 200, JSON, no 500."""
    import random

    rng = random.Random(1234)
    good = data_url(images[0])
    values = [None, True, 0, -1, 3, 2**70, 1e308, 0.5, "", "x", "1", [], ["a"], {}, {"a": 1}, [[["deep"]]], good,
              good[:50], "data:image/png;base64,", "\ud800", "{}{}", "A" * 5000]
    fields = ["image", "prompt", "question", "template", "texts", "mode", "input", "images", "messages", "stream",
              "n", "max_tokens", "max_new_tokens", "num_beams", "temperature", "top_p", "top_k", "seed", "do_sample",
              "num_return_sequences", "stream_options", "stop", "encoding_format", "junk"]
    paths = ["/v1/caption", "/v1/ask", "/v1/chat/completions", "/v1/match", "/v1/embeddings", "/v1/models"]
    for _ in range(150):
        path = rng.choice(paths)
        if rng.random() < 0.2:
            body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))
            ctype = rng.choice(["application/json", "multipart/form-data; boundary=zz", "text/plain",
                                "application/x-www-form-urlencoded"])
            result = request(server, "POST", path, body=body, headers={"Content-Type": ctype})
        else:
            payload = chat_payload(images[1], "what?") if path.endswith("completions") else {"image": good}
            for _ in range(rng.randint(1, 3)):
                payload[rng.choice(fields)] = rng.choice(values)
            result = request(server, rng.choice(["POST", "POST", "POST", "GET"]), path, json_body=payload)
        code, headers, body = result
        assert code < 500 and "json" in headers.get("content-type", ""), (path, code, body)
        assert code == 200 or "message" in body["error"]
    assert request(server, "GET", "/health")[2]["status"] == "ok"


def test_no_files_and_no_urls_unless_enabled(server, pipe, images, tmp_path):
    secret = tmp_path / "photo.png"
    images[0].save(secret)
    for value in (str(secret), f"file://{secret}", "/etc/passwd", "~/photo.jpg", "../photo.png",
                  "ftp://example.com/a.png"):
        message = assert_error(post(server, "/v1/caption", {"image": value}), 400)
        assert "disk" in message or "not accepted" in message, message
    assert_error(post(server, "/v1/caption", {"image": "http://127.0.0.1:9/cat.png"}), 400, "disabled")
    payload = chat_payload(images[0], "what?")
    payload["messages"][0]["content"][1]["image_url"]["url"] = "https://127.0.0.1:9/cat.png"
    assert_error(post(server, "/v1/chat/completions", payload), 400, "disabled")


def test_url_fetch_when_enabled(pipe, images):
    blob = png_bytes(images[1])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/cat.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(blob)))
                self.end_headers()
                self.wfile.write(blob)
            elif self.path == "/to-file":
                self.send_response(302)
                self.send_header("Location", "file:///etc/passwd")
                self.end_headers()
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    images_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=images_server.serve_forever, daemon=True)
    thread.start()
    s = serve(pipe, allow_url_fetch=True, url_fetch_timeout=5)
    base = f"http://127.0.0.1:{images_server.server_address[1]}"
    try:
        code, _, body = post(s, "/v1/caption", {"image": f"{base}/cat.png"})
        assert code == 200 and body["caption"] == pipe.caption(images[1])
        assert_error(post(s, "/v1/caption", {"image": f"{base}/missing.png"}), 400, "could not fetch")
        assert_error(post(s, "/v1/caption", {"image": f"{base}/to-file"}), 400, "could not fetch")
        assert_error(post(s, "/v1/caption", {"image": "file:///etc/passwd"}), 400, "not accepted")
    finally:
        s.stop()
        images_server.shutdown()
        images_server.server_close()


# --- time limits, disconnects, load --------------------------------------------------------------------------------


@pytest.fixture
def slow_decoding(monkeypatch):
    """Each decode step (and each streamed piece) takes 30 ms; records what the model did."""
    record = {"steps": 0, "stream_pieces": 0, "stream_closed": False}
    real_make_runner, real_stream = G.make_runner, Engine.stream

    class Slow:
        def __init__(self, runner):
            self.runner = runner

        def __call__(self, tokens):
            time.sleep(0.03)
            record["steps"] += 1
            return self.runner(tokens)

        def __getattr__(self, name):
            return getattr(self.runner, name)

    def slow_stream(self, *args, **kwargs):
        try:
            for piece in real_stream(self, *args, **kwargs):
                time.sleep(0.03)
                record["stream_pieces"] += 1
                yield piece
        finally:
            record["stream_closed"] = True

    monkeypatch.setattr(G, "make_runner", lambda *a: Slow(real_make_runner(*a)))
    monkeypatch.setattr(Engine, "stream", slow_stream)
    return record


def wait_until(condition, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_timeout_cancels_the_request(pipe, images, slow_decoding):
    s = serve(pipe, timeout=1.0)
    try:
        worker = s.app.state.worker
        start = time.monotonic()
        payload = {"image": data_url(images[0]), "num_beams": 1, "max_new_tokens": 100, "min_new_tokens": 100}
        assert_error(post(s, "/v1/caption", payload), 504, "limit")
        assert time.monotonic() - start < 4
        # The decode stopped between two steps instead of running its 100 (3 s).
        assert wait_until(lambda: not worker.busy and worker.stats["cancelled"] >= 1)
        assert slow_decoding["steps"] < 60
        # Beam search stops too, and the server goes on serving.
        assert_error(post(s, "/v1/caption", {**payload, "num_beams": 3}), 504, "limit")
        assert wait_until(lambda: not worker.busy and worker.stats["cancelled"] >= 2)
        code, _, body = post(s, "/v1/caption", {"image": data_url(images[0]), "num_beams": 1, "max_new_tokens": 3})
        assert code == 200 and body["caption"] == pipe.caption(images[0], num_beams=1, max_new_tokens=3)
        # A client that sends half its body and stalls gets 504 too.
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"image\": \"")
            reply = http.client.HTTPResponse(sock)
            reply.begin()
            assert reply.status == 504 and json.loads(reply.read())["error"]["code"] == 504
    finally:
        s.stop()


def test_disconnects_free_the_model(server, pipe, images, slow_decoding):
    worker = server.app.state.worker
    # A stream whose client leaves after the first pieces.
    payload = chat_payload(images[0], "what?", stream=True, max_tokens=100, min_new_tokens=100)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(payload), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    r.fp.readline()
    r.fp.readline()
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert wait_until(lambda: slow_decoding["stream_closed"] and not worker.busy)
    assert slow_decoding["stream_pieces"] < 60
    # A plain request whose client leaves before the answer.
    before = worker.stats["cancelled"]
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    body = json.dumps({"image": data_url(images[1]), "num_beams": 1, "max_new_tokens": 100,
                       "min_new_tokens": 100}).encode()
    sock.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert wait_until(lambda: worker.busy)
    sock.close()
    assert wait_until(lambda: worker.stats["cancelled"] > before and not worker.busy)
    code, _, out = post(server, "/v1/caption", {"image": data_url(images[2]), "num_beams": 1, "max_new_tokens": 2})
    assert code == 200 and out["caption"] == pipe.caption(images[2], num_beams=1, max_new_tokens=2)


def test_full_queue_is_503(pipe, images, slow_decoding):
    s = serve(pipe, max_queue=1, max_batch=1)
    try:
        payload = {"image": data_url(images[0]), "num_beams": 1, "max_new_tokens": 10, "min_new_tokens": 10}
        with ThreadPoolExecutor(6) as ex:
            results = list(ex.map(lambda _: post(s, "/v1/caption", payload), range(6)))
        codes = sorted(code for code, _, _ in results)
        assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
        busy = next(r for r in results if r[0] == 503)
        assert_error(busy, 503, "busy")
        assert busy[1].get("retry-after") == "1"
    finally:
        s.stop()


# --- retrieval -----------------------------------------------------------------------------------------------------


def test_match(retrieval_server, retrieval, images):
    texts = ["a cat", "a dog on a couch"]
    code, _, body = post(retrieval_server, "/v1/match", {"image": data_url(images[0]), "texts": texts})
    assert code == 200 and body["mode"] == "itm" and body["texts"] == texts
    np.testing.assert_allclose(body["scores"], retrieval.match(images[0], texts), rtol=1e-5, atol=1e-6)
    code, _, body = post_form(retrieval_server, "/v1/match", {"texts": texts, "mode": "itc"},
                              {"image": png_bytes(images[0])})
    assert code == 200
    np.testing.assert_allclose(body["scores"], retrieval.similarity([images[0]], texts)[0], rtol=1e-5, atol=1e-6)
    code, _, body = post(retrieval_server, "/v1/match", {"image": data_url(images[1]), "texts": "a cat"})
    assert code == 200 and len(body["scores"]) == 1
    assert_error(post(retrieval_server, "/v1/match", {"image": data_url(images[0]), "texts": ["a"], "mode": "x"}),
                 400, "mode")
    assert_error(post(retrieval_server, "/v1/match", {"image": data_url(images[0])}), 400, "texts")
    assert_error(post(retrieval_server, "/v1/caption", {"image": data_url(images[0])}), 400, "captioning")
    assert request(retrieval_server, "GET", "/health")[2]["task"] == "retrieval"


def test_embeddings(retrieval_server, retrieval, images):
    texts = ["a cat", "two dogs playing in the snow"]
    code, _, body = post(retrieval_server, "/v1/embeddings", {"model": "tiny-blip2-itm", "input": texts})
    assert code == 200 and body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
    np.testing.assert_allclose([d["embedding"] for d in body["data"]], retrieval.embed_texts(texts), rtol=1e-5,
                               atol=1e-6)
    code, _, body = post(retrieval_server, "/v1/embeddings", {"input": "a cat", "encoding_format": "base64"})
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vector, retrieval.embed_texts("a cat"), rtol=1e-5, atol=1e-6)
    code, _, body = post_form(retrieval_server, "/v1/embeddings", files={"images": [png_bytes(im) for im in images]})
    assert code == 200 and len(body["data"]) == 3
    np.testing.assert_allclose([d["embedding"] for d in body["data"]], retrieval.embed_images(images), rtol=1e-5,
                               atol=1e-6)
    code, _, body = post(retrieval_server, "/v1/embeddings", {"image": data_url(images[0])})
    assert code == 200 and np.asarray(body["data"][0]["embedding"]).shape == retrieval.embed_images(images[0]).shape
    assert_error(post(retrieval_server, "/v1/embeddings", {}), 400, "input")
    assert_error(post(retrieval_server, "/v1/embeddings", {"input": "a", "image": data_url(images[0])}), 400,
                 "not both")
    assert_error(post(retrieval_server, "/v1/embeddings", {"input": "a", "encoding_format": "int8"}), 400,
                 "encoding_format")
    assert_error(post(retrieval_server, "/v1/embeddings", {"input": [1, 2]}), 400, "string")
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{retrieval_server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    result = client.embeddings.create(model="tiny-blip2-itm", input=texts)  # the client asks for base64
    np.testing.assert_allclose([d.embedding for d in result.data], retrieval.embed_texts(texts), rtol=1e-5, atol=1e-6)


def test_retrieval_burst_equals_sequential(retrieval_server, images):
    jobs = []
    for i in range(12):
        if i % 3 == 0:
            jobs.append(("/v1/embeddings", {"input": [f"text number {i}", "a cat"]}))
        elif i % 3 == 1:
            jobs.append(("/v1/embeddings", {"image": data_url(images[i % 3])}))
        else:
            jobs.append(("/v1/match", {"image": data_url(images[i % 3]), "texts": ["a cat", f"thing {i}"]}))
    sequential = [post(retrieval_server, *job) for job in jobs]
    with ThreadPoolExecutor(len(jobs)) as ex:
        concurrent = list(ex.map(lambda job: post(retrieval_server, *job), jobs))
    for (c1, _, a), (c2, _, b) in zip(sequential, concurrent):
        assert c1 == c2 == 200
        # float32 results of differently composed batches: equal up to rounding
        if "scores" in a:
            np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-4, atol=1e-5)
        else:
            np.testing.assert_allclose([d["embedding"] for d in a["data"]], [d["embedding"] for d in b["data"]],
                                       rtol=1e-4, atol=1e-5)


# --- the command line ------------------------------------------------------------------------------------------------


def test_serve_command(monkeypatch, capsys):
    from mlx_blip2.cli import build_parser, main, serve

    args = build_parser().parse_args(["serve", "--model", str(TINY), "--max-batch", "4", "--api-key", "k"])
    assert args.func is serve.run and args.host == "127.0.0.1" and args.port == 8080
    assert args.max_batch == 4 and args.api_key == "k" and not args.allow_url_fetch
    assert serve.server_settings(args)["max_batch"] == 4 and serve.server_settings(args)["api_key"] == "k"
    monkeypatch.setattr(serve, "missing_server_packages", lambda: ["uvicorn"])
    assert main(["serve", "--model", str(TINY)]) == 2
    assert "pip install" in capsys.readouterr().err


def test_a_relative_model_is_named_by_its_absolute_path(monkeypatch, images):
    """/v1/models and every reply name a local checkpoint the same from any folder."""
    import uvicorn

    from mlx_blip2.cli import main

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.setdefault("app", app))
    monkeypatch.chdir(TINY.parent.parent)
    assert main(["serve", "-m", f"fixtures/{TINY.name}", "--port", "0"]) == 0
    with BackgroundServer(served["app"]) as s:
        assert request(s, "GET", "/v1/models")[2]["data"][0]["id"] == str(TINY.resolve())
        code, _, body = post(s, "/v1/chat/completions", chat_payload(images[0], max_tokens=3))
        assert code == 200 and body["model"] == str(TINY.resolve())
        assert post(s, "/v1/caption", {"image": data_url(images[0]), "max_new_tokens": 3})[2]["model"] == \
            str(TINY.resolve())


def test_process_exits_cleanly_after_serving():
    """The model thread ends its MLX stream: exiting after a served request must not abort (it did ~1 run in 5)."""
    import subprocess
    import sys

    script = (
        "from mlx_blip2.pipelines import load; from mlx_blip2.server import BackgroundServer, create_app\n"
        "import json, urllib.request\n"
        f"app = create_app(load({str(FIXTURES / 'tiny-blip2-opt')!r}))\n"
        "with BackgroundServer(app) as s:\n"
        "    req = urllib.request.Request(s.url + '/v1/ask', data=json.dumps({'image': 'data:image/png;base64,"
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC', "
        "'question': 'what?', 'max_new_tokens': 2}).encode(), headers={'Content-Type': 'application/json'})\n"
        "    assert json.loads(urllib.request.urlopen(req).read())['answer'] is not None\n"
    )
    for _ in range(4):
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]


# --- units: the pieces create_app assembles ------------------------------------------------------------------------


def test_openapi_docs_document_every_endpoint(server):
    code, _, spec = request(server, "GET", "/openapi.json")
    assert code == 200
    paths = spec["paths"]
    for path in ("/v1/caption", "/v1/ask", "/v1/chat/completions", "/v1/match", "/v1/embeddings", "/health"):
        assert path in paths, path
    match = paths["/v1/match"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"image", "texts", "mode"} <= set(match["properties"]) and match["required"] == ["texts"]
    caption = paths["/v1/caption"]["post"]["requestBody"]["content"]
    assert caption["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
    beams = caption["application/json"]["schema"]["properties"]["num_beams"]["anyOf"][0]
    assert beams["minimum"] == 1 and beams["maximum"] == 16  # declared range, server limit on top


def test_docs_are_served_from_this_machine(server):
    """/docs works offline: Swagger UI's files come from this server, nothing from a CDN."""
    import re

    code, _, html = request(server, "GET", "/docs")
    assert code == 200
    urls = re.findall(rb"""(?:src|href)=["']([^"']+)["']|url: *["']([^"']+)["']""", html)
    urls = [a or b for a, b in urls]
    assert urls and all(u.startswith(b"/") for u in urls), urls
    assert b"cdn" not in html.lower()
    for url in urls:
        code, headers, body = request(server, "GET", url.decode())
        assert code == 200 and len(body) > 2, url
    assert b"SwaggerUIBundle" in request(server, "GET", "/docs/assets/swagger-ui-bundle.js")[2]
    assert request(server, "GET", "/docs/assets/index.html")[0] == 404
    assert request(server, "GET", "/redoc")[0] == 404  # ReDoc has no offline copy


def test_docs_without_their_package_say_what_to_install(pipe, monkeypatch):
    from mlx_blip2.server import docs

    monkeypatch.setattr(docs, "swagger_folder", lambda: None)
    s = serve(pipe)
    try:
        code, _, html = request(s, "GET", "/docs")
        assert code == 503 and b"pip install fastapi-offline" in html and b"/openapi.json" in html
        assert request(s, "GET", "/openapi.json")[0] == 200
    finally:
        s.stop()


def test_schemas_are_generated_from_the_options_declaration():
    config = ServerConfig(max_new_tokens=64, max_beams=4)
    schemas = build_schemas(config)
    fields = schemas.caption.model_fields
    assert set(PUBLIC_OPTIONS) <= set(fields)
    for name in PUBLIC_OPTIONS:
        assert fields[name].description == OPTION_FIELDS[name].metadata["help"]
    props = schemas.caption.model_json_schema()["properties"]
    assert props["top_p"]["anyOf"][0] == {"exclusiveMinimum": 0, "maximum": 1, "type": "number"}
    assert props["max_new_tokens"]["anyOf"][0]["maximum"] == 64 and props["num_beams"]["anyOf"][0]["maximum"] == 4
    assert props["early_stopping"]["anyOf"][0]["enum"] == [False, True, "never"]
    chat = schemas.chat.model_fields
    assert {"n", "max_tokens", "max_completion_tokens"} <= set(chat) and "max_new_tokens" not in chat
    assert build_schemas(ServerConfig(max_new_tokens=64, max_beams=4)) is schemas  # one build per config


def test_schema_validation_errors_name_the_field():
    s = build_schemas(ServerConfig(max_text_chars=10, max_texts=3))

    def error(model, data, form=False):
        with pytest.raises(APIError) as e:
            validate(model, data, form)
        assert e.value.status == 400
        return e.value.param, e.value.message

    assert validate(s.caption, {"num_beams": 2.0}).num_beams == 2  # an integral float is an integer
    assert validate(s.caption, {"num_beams": "3", "do_sample": "true"}, from_form=True).num_beams == 3
    assert validate(s.ask, {"question": ["a", "b"]}).question == ["a", "b"]
    assert error(s.caption, {"num_beams": "3"})[0] == "num_beams"  # JSON is strict
    assert error(s.caption, {"max_new_tokens": True})[0] == "max_new_tokens"
    assert error(s.caption, {"num_beams": 2.5})[0] == "num_beams"
    assert error(s.caption, {"temperature": float("nan")})[0] == "temperature"
    assert error(s.caption, {"top_p": 0})[0] == "top_p"
    assert error(s.caption, {"colour": "red"}) == ("colour", "unknown field 'colour'")
    assert error(s.ask, {}) == ("question", "'question' is required")
    assert error(s.ask, {"question": []}) == ("question", "'question' is an empty list")
    assert error(s.ask, {"question": ["a"] * 4})[1] == "'question' has 4 items; at most 3 items are accepted"
    assert "characters" in error(s.ask, {"question": "x" * 11})[1]
    assert "string" in error(s.ask, {"question": [1]})[1]
    assert "Unicode" in error(s.caption, {"prompt": "\ud800"})[1]
    assert error(s.match, {"texts": "a", "mode": "x"})[0] == "mode"
    assert error(s.embeddings, {"input": "a", "encoding_format": "int8"})[0] == "encoding_format"


def test_option_parsing_resolves_the_recipe():
    s = build_schemas(ServerConfig())
    req = validate(s.caption, {"temperature": 0.5, "prompt": "a photo of"})
    assert generation_overrides(req) == {"temperature": 0.5}
    options = resolve_options(CAPTION_DEFAULTS, generation_overrides(req))
    assert options.do_sample and options.num_beams == 1 and options.max_new_tokens == 30  # sampling replaces beams
    with pytest.raises(APIError, match="min_new_tokens") as e:
        resolve_options(CAPTION_DEFAULTS, {"min_new_tokens": 9, "max_new_tokens": 3})
    assert e.value.param == "min_new_tokens"
    with pytest.raises(APIError, match="num_beams") as e:
        resolve_options(VQA_DEFAULTS, {"num_beams": 3}, stream=True)
    # OpenAI's names map to ours, and errors use the name the client sent.
    chat = validate(s.chat, {"messages": [], "n": 6, "max_tokens": 7})
    assert generation_overrides(chat) == {"num_return_sequences": 6, "max_new_tokens": 7}
    with pytest.raises(APIError) as e:
        resolve_options(CAPTION_DEFAULTS, generation_overrides(chat), names=request_names(chat))
    assert e.value.param == "n" and "'n'" not in e.value.message and "n must be" in e.value.message


def test_image_input():
    config = ServerConfig(max_upload_bytes=20_000, max_pixels=4096)
    blob = png_bytes(Image.new("RGB", (30, 20), (10, 200, 30)))
    b64 = base64.b64encode(blob).decode()
    assert image_bytes_from_string(f"data:image/png;base64,{b64}", config) == blob
    assert image_bytes_from_string(b64.rstrip("="), config) == blob  # padding optional
    assert image_bytes_from_string(base64.urlsafe_b64encode(blob).decode(), config) == blob

    def status(value, **kw):
        with pytest.raises(APIError) as e:
            load_image(value, ServerConfig(**{**config.__dict__, **kw}), "img")
        assert e.value.param == "img"
        return e.value.status, e.value.message

    assert status("http://example.com/cat.png")[1].endswith("data URL") and "disabled" in status("https://x/y.png")[1]
    assert "not accepted" in status("file:///etc/passwd")[1]
    for path in ("/etc/passwd", "~/cat.jpg", "../x.png", "C:\\photos\\cat.png", "cat.jpeg"):
        assert "disk" in status(path)[1], path
    assert status("A" * 40_000)[0] == 413  # refused before decoding
    assert status(base64.b64encode(b"not an image").decode()) == (400, "'img' is not an image in a supported "
                                                                        f"format ({', '.join(available_formats())})")
    assert status(data_url(Image.new("RGB", (100, 100))))[0] == 413  # 10,000 pixels
    assert status("")[1] == "'img' is empty"
    image = decode_image(blob, config, size={"width": 8, "height": 8, "resample": 3})
    assert image.size == (8, 8) and image.mode == "RGB"
    with pytest.raises(APIError, match="required"):
        image_sources({}, {})
    with pytest.raises(APIError, match="one image"):
        image_sources({"image": "x"}, {"image": [b"y"]})
    assert image_sources({"images": ["a", "b"]}, {"image": [b"c"]}, ("image", "images"), many=True) == [
        ("image", b"c"), ("images", "a"), ("images", "b")]


def test_api_key():
    assert given_key([(b"authorization", b"Bearer  abc ")]) == b"abc"
    assert given_key([(b"x-api-key", b"abc")]) == b"abc"
    assert authorized([(b"authorization", b"bearer abc")], "abc") and not authorized([], "abc")
    assert not authorized([(b"authorization", b"Basic abc")], "abc")
    sent, called = [], []

    async def app(scope, receive, send):
        called.append(scope["path"])

    async def send(message):
        sent.append(message)

    guarded = APIKeyMiddleware(app, "abc")
    for path, headers in (("/health", []), ("/v1/models", [(b"authorization", b"Bearer abc")]),
                          ("/v1/models", [(b"authorization", b"Bearer no")]), ("/docs", [])):
        asyncio.run(guarded({"type": "http", "path": path, "headers": headers}, None, send))
    assert called == ["/health", "/v1/models"]
    assert [m["status"] for m in sent if "status" in m] == [401, 401]
    assert json.loads(sent[1]["body"])["error"]["type"] == "authentication_error"


def test_openai_format():
    image = {"type": "image_url", "image_url": {"url": "data:x"}}
    messages = [{"role": "system", "content": "brief"}, {"role": "user", "content": [image]}]
    assert chat_prompt(messages) == (("messages[1].content[0]", "data:x"), None)  # no text: a caption
    messages[1]["content"] = [{"type": "text", "text": " what? "}, image]
    messages += [{"role": "assistant", "content": "a cat", "refusal": None}, {"role": "user", "content": "colour?"}]
    assert chat_prompt(messages)[1] == "Question: what? Answer: a cat Question: colour? Answer:"
    for bad, word in (("hi", "non-empty"), ([{"role": "robot"}], "role"), ([{"role": "user", "content": "x"}],
                      "exactly one image"), ([{"role": "user", "content": [image], "tools": [1]}], "tools"),
                      ([{"role": "user", "content": [image, image]}], "got 2")):
        with pytest.raises(APIError, match=word):
            chat_prompt(bad)
    ids = ChatIds("tiny", id="chatcmpl-1", created=5)
    body = completion_body(ids, [Completion("a cat", [5, 2], "stop", 40, 2)])
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "a cat"}
    assert body["usage"] == {"prompt_tokens": 40, "completion_tokens": 2, "total_tokens": 42}
    event = chunk(ids, {"content": "hi"})
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert json.loads(event[6:])["choices"][0]["delta"] == {"content": "hi"}
    assert json.loads(chunk(ids, {}, usage={"total_tokens": 1})[6:])["choices"] == []
    assert sse("[DONE]") == "data: [DONE]\n\n"
    text = StreamText()
    assert [text.delta(t) for t in (" ", " a", " cat")] == ["", "a", " cat"]
    vectors = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = embeddings_body(vectors, "tiny", "base64", 4)
    assert np.array_equal(np.frombuffer(base64.b64decode(out["data"][1]["embedding"]), "<f4"), vectors[1])
    assert embeddings_body(vectors, "tiny")["data"][0]["embedding"] == [0.0, 1.0, 2.0]


def test_worker_batches_jobs_into_one_engine_call():
    calls = []

    class FakeEngine:
        def generate(self, rows, options, should_stop=None):
            calls.append([r.prompt for r in rows])
            if any(r.prompt == "long" for r in rows):
                raise ContextLengthError("too long")
            return [[Completion(f"re: {r.prompt}", [1], "stop", 3, 1)] for r in rows]

    class FakePipeline:
        kind, engine = "captioning", FakeEngine()

    worker = ModelWorker(FakePipeline(), max_batch=8, batch_window=0.5)
    options = resolve_recipe(CAPTION_DEFAULTS)
    key = generation_key(options, True)
    assert generation_key(resolve_recipe(CAPTION_DEFAULTS, {"temperature": 0.5, "seed": 1}), True) is None
    jobs = [Job("generate", {"rows": [Row(prompt=p) for p in prompts], "options": options}, key, len(prompts))
            for prompts in (["a"], ["b", "c"], ["long"], ["d"])]
    for _ in jobs:
        worker.arrive()
    worker.start()  # queued before the worker looks: one batch
    try:
        for job in jobs:
            worker.submit(job)
            worker.depart()
        assert [t.text for t in jobs[1].future.result(10)[1]] == ["re: c"]
        assert jobs[0].future.result(10)[0][0].text == "re: a" and jobs[3].future.result(10)[0][0].text == "re: d"
        with pytest.raises(ContextLengthError):
            jobs[2].future.result(10)
        assert from_worker(jobs[2].future.exception()).param == "max_new_tokens"
    finally:
        worker.stop()
    assert calls[0] == ["a", "b", "c", "long", "d"]  # one call; then each alone, so only the long one fails
    assert sorted(map(tuple, calls[1:])) == [("a",), ("b", "c"), ("d",), ("long",)]
    assert worker.stats["largest_batch"] == 5
