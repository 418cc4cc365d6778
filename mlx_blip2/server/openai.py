"""OpenAI's formats: chat messages -> BLIP-2's prompt, chat completion bodies, server-sent event chunks, and
embeddings bodies. Pure functions over dicts; the routes call them."""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from .errors import APIError

ROLES = ("system", "developer", "user", "assistant")


def json_bytes(data) -> bytes:
    return json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8", "replace")


# --- requests ----------------------------------------------------------------------------------------------------


def _message_parts(message, param: str) -> tuple[str, list, list[tuple[str, str]]]:
    """(role, texts, images [(param, url)]) of one message."""
    if not isinstance(message, dict):
        raise APIError(400, f"'{param}' must be an object", param)
    # Clients echo assistant messages back with empty extras (refusal, tool_calls...): those are fine.
    extra = sorted(k for k, v in message.items() if k not in ("role", "content", "name") and v)
    if extra:
        raise APIError(400, f"'{param}.{extra[0]}' is not supported by this server", param)
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise APIError(400, f"'{param}.role' must be system, developer, user or assistant", param)
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else ([] if content is None else content)
    if not isinstance(parts, list):
        raise APIError(400, f"'{param}.content' must be a string or a list of parts", param)
    texts, images = [], []
    for j, part in enumerate(parts):
        pp = f"{param}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise APIError(400, f"'{pp}.image_url.url' must be a string (a data URL)", pp)
            if role != "user":
                raise APIError(400, f"'{pp}': only user messages may carry images", pp)
            images.append((pp, url))
        else:
            raise APIError(400, f"'{pp}' must be a text part or an image_url part", pp)
    return role, texts, images


def chat_prompt(messages, max_text_chars: int = 4000) -> tuple[tuple[str, str], str | None]:
    """((param, image source), prompt) from OpenAI messages: user turns become "Question: ... Answer:" and assistant
    turns their answers, as BLIP-2 was prompted for conversations; no text at all means a caption (prompt None)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    images, turns = [], []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        role, texts, found = _message_parts(message, param)
        images += found
        text = " ".join(t.strip() for t in texts if t.strip())
        if len(text) > max_text_chars:
            raise APIError(400, f"'{param}' is longer than {max_text_chars} characters", param)
        if role in ("user", "assistant"):
            turns.append((role, text))
    if len(images) != 1:
        raise APIError(400, f"BLIP-2 needs exactly one image per conversation (an image_url part with a data "
                            f"URL), got {len(images)}", "messages")
    if not turns or turns[-1][0] != "user":
        raise APIError(400, "the last message must be the user's", "messages")
    if not any(text for _, text in turns):
        return images[0], None
    pieces = [f"Question: {text} Answer:" if role == "user" else text for role, text in turns if text]
    return images[0], " ".join(pieces)


def check_unsupported(request) -> bool:
    """APIError for the OpenAI features this server does not have; returns whether to include usage in a stream."""
    for name, ok in (("stop", None), ("logprobs", False), ("frequency_penalty", 0), ("presence_penalty", 0)):
        if getattr(request, name) not in (None, ok):
            raise APIError(400, f"'{name}' is not supported by this server", name)
    if request.response_format not in (None, {"type": "text"}):
        raise APIError(400, "only text responses are supported", "response_format")
    options = request.stream_options
    if options is not None and set(options) - {"include_usage"}:
        raise APIError(400, "'stream_options' may only hold include_usage", "stream_options")
    return bool((options or {}).get("include_usage"))


# --- responses ---------------------------------------------------------------------------------------------------


@dataclass
class ChatIds:
    """What every chunk of one completion repeats."""

    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(ids: ChatIds, completions) -> dict:
    """A ``chat.completion`` from one row's :class:`~mlx_blip2.pipelines.engine.Completion` list."""
    choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                "finish_reason": c.finish_reason} for i, c in enumerate(completions)]
    return {"id": ids.id, "object": "chat.completion", "created": ids.created, "model": ids.model,
            "choices": choices, "usage": usage(completions[0].prompt_tokens,
                                               sum(c.generation_tokens for c in completions))}


def sse(data) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json_bytes(data).decode()}\n\n"


def chunk(ids: ChatIds, delta: dict, finish_reason: str | None = None, usage: dict | None = None) -> str:
    """A ``chat.completion.chunk`` event; with ``usage``, the usage chunk (no choices)."""
    body = {"id": ids.id, "object": "chat.completion.chunk", "created": ids.created, "model": ids.model,
            "choices": [] if usage else [{"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": finish_reason}]}
    if usage:
        body["usage"] = usage
    return sse(body)


class StreamText:
    """Streamed pieces -> content deltas, the leading space dropped as the non-streamed text is stripped."""

    def __init__(self):
        self.started = False

    def delta(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        return text


def embeddings_body(vectors, model: str, encoding_format: str = "float", prompt_tokens: int = 0) -> dict:
    """An embeddings ``list``: float lists, or base64 of little-endian float32."""
    items = []
    for i, v in enumerate(vectors):
        v = np.asarray(v, dtype=np.float32)
        value = base64.b64encode(v.astype("<f4").tobytes()).decode() if encoding_format == "base64" else v.tolist()
        items.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": items, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
