"""Call the HTTP server's endpoints: caption, VQA, OpenAI-style chat (plain and streamed), models and health.

    python examples/server_client.py [--model Salesforce/blip2-opt-2.7b] [IMAGE]
    python examples/server_client.py --url http://127.0.0.1:8080 [--api-key KEY] [IMAGE]

Without ``--url`` it starts the server in-process on a free loopback port with ``--model`` (what
``mlx-blip2 serve --model M`` runs), calls each endpoint once and stops it. A retrieval checkpoint
(Salesforce/blip2-itm-vit-g) gets /v1/match and /v1/embeddings instead. Only the standard library talks to the server.
Needs the server extra: pip install 'mlx-blip2[server]'.
"""

import argparse
import base64
import json
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
parser = argparse.ArgumentParser()
parser.add_argument("--model", default="Salesforce/blip2-opt-2.7b")
parser.add_argument("--url", help="a running server (default: start one in-process with --model)")
parser.add_argument("--api-key")
parser.add_argument("image", nargs="?", default=str(HERE / "images" / "gradient.png"))
args = parser.parse_args()

headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def call(path, payload=None, body=None, content_type="application/json"):
    """POST JSON (or a prepared body), or GET without either; returns the parsed JSON answer."""
    if payload is not None:
        body = json.dumps(payload).encode()
    req = urllib.request.Request(url + path, data=body, headers={**headers, "Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=600) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:  # errors are JSON too: {"error": {"message": ...}}
        sys.exit(f"{path}: HTTP {e.code}: {json.loads(e.read())['error']['message']}")


def upload(path, fields, image_bytes):
    """POST multipart/form-data with the image as a file upload."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="image.png"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + image_bytes + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return call(path, body=b"".join(parts), content_type=f"multipart/form-data; boundary={boundary}")


def chat_stream(payload):
    """POST with stream: true; print the server-sent events' text as it arrives."""
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps({**payload, "stream": True}).encode(),
                                 headers={**headers, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as response:
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                print(choice["delta"].get("content") or "", end="", flush=True)
    print()


def run():
    image = Path(args.image).read_bytes()
    data_url = "data:image/png;base64," + base64.b64encode(image).decode()
    health = call("/health")
    print("health:", health)
    models = [m["id"] for m in call("/v1/models")["data"]]
    print("models:", models)
    if health["task"] == "retrieval":
        texts = ["a smooth colour gradient", "a photo of a cat"]
        print("match (ITM):", call("/v1/match", {"image": data_url, "texts": texts})["scores"])
        print("match (ITC):", call("/v1/match", {"image": data_url, "texts": texts, "mode": "itc"})["scores"])
        text = call("/v1/embeddings", {"input": texts})["data"]
        print("text embeddings:", [len(d["embedding"]) for d in text], "floats each")
        img = call("/v1/embeddings", {"image": data_url})["data"][0]["embedding"]
        print("image embedding:", len(img), "query vectors of", len(img[0]), "floats")
        return
    print("caption (upload):", upload("/v1/caption", {}, image)["caption"])
    print("caption (prompt, greedy):",
          call("/v1/caption", {"image": data_url, "prompt": "a photo of", "num_beams": 1})["caption"])
    print("ask:", call("/v1/ask", {"image": data_url, "question": ["what is it?", "what colour is it?"]})["answers"])
    chat = {"model": models[0], "max_tokens": 20, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is in the picture?"},
        {"type": "image_url", "image_url": {"url": data_url}}]}]}
    reply = call("/v1/chat/completions", chat)
    print("chat:", reply["choices"][0]["message"]["content"], reply["usage"])
    print("chat (streamed): ", end="")
    chat_stream(chat)


if args.url:
    url = args.url.rstrip("/")
    run()
else:
    from mlx_blip2.pipelines import load
    from mlx_blip2.server import INSTALL_HINT, missing_server_packages

    if missing_server_packages():
        sys.exit(f"the server needs {', '.join(missing_server_packages())}: {INSTALL_HINT}")
    from mlx_blip2.server import BackgroundServer, create_app

    app = create_app(load(args.model), model_name=args.model, api_key=args.api_key)
    with BackgroundServer(app) as server:  # what `mlx-blip2 serve --model M --port 0` runs, on a thread
        url = server.url
        print(f"serving {args.model} at {url}")
        run()
