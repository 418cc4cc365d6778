"""One server's limits and behaviour (every field is a keyword of :func:`~mlx_blip2.server.create_app`)."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class ServerConfig:
    model_name: str = "blip2"
    max_batch: int = 8  # most rows (images x questions) in one model call
    batch_window: float = 0.01  # most seconds to wait for requests still being read, to batch them with the first
    max_queue: int = 256  # queued jobs beyond this get 503
    timeout: float = 120.0  # seconds per request, queueing included; then 504 and the job is cancelled
    max_upload_bytes: int = 20 * 1024 * 1024  # per image, after base64 decoding
    max_pixels: int = 50_000_000  # width x height, checked from the header before decoding
    allow_url_fetch: bool = False  # fetch http(s) image URLs (off: such requests get 400)
    url_fetch_timeout: float = 10.0
    api_key: str | None = None
    max_new_tokens: int = 512  # the largest max_new_tokens a request may ask for
    max_beams: int = 16  # the largest num_beams (and num_return_sequences / n) a request may ask for
    max_texts: int = 256  # texts per match/embeddings request, questions per ask request, images per embeddings
    max_text_chars: int = 4000
    decode_threads: int = 0  # concurrent image decodes (0: min(8, CPU count))
    allowed_hosts: tuple[str, ...] = ()  # Host names served besides 127.0.0.1, localhost, [::1] (see door.py)
    cors_origins: tuple[str, ...] = ()  # web origins let in (with CORS headers) besides the server's own


def make_config(**settings) -> ServerConfig:
    """A ServerConfig; TypeError naming any unknown setting."""
    unknown = set(settings) - {f.name for f in fields(ServerConfig)}
    if unknown:
        raise TypeError(f"unknown server settings: {', '.join(sorted(unknown))}")
    for name in ("allowed_hosts", "cors_origins"):
        if isinstance(settings.get(name), str):
            settings[name] = (settings[name],)
        elif name in settings:
            settings[name] = tuple(settings[name])
    return ServerConfig(**settings)
