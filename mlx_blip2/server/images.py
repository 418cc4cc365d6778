"""Image input: an upload's bytes, base64, a data URL or (only with ``allow_url_fetch``) an http(s) URL -> bytes ->
:func:`mlx_blip2.images.open_image` with this server's byte and pixel limits. Never reads the server's own files:
``file:`` URLs are refused, and strings that look like paths get a 400 saying why."""

from __future__ import annotations

import base64
import binascii
import re
import urllib.error
import urllib.request

from ..images import ImageLoadError, open_image
from .config import ServerConfig
from .errors import APIError, image_error

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
_PATH_LIKE = re.compile(r"^(/|~|\.{1,2}/|[a-zA-Z]:[\\/])|\.(jpe?g|png|webp|gif|bmp|tiff?|heic|avif)$", re.IGNORECASE)
PATH_ERROR = ("'{}' looks like a file path: the server never reads files from its own disk; send the image bytes as "
              "a multipart upload, base64 or a data URL")
SEND_BYTES = "send the image bytes as a multipart upload, base64 or a data URL"


def human_size(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def too_large(what: str, size: int, config: ServerConfig, param: str) -> APIError:
    return APIError(413, f"{what} is {human_size(size)}; this server accepts at most "
                         f"{human_size(config.max_upload_bytes)} per image (this server's --max-upload-mb)", param)


def looks_like_path(text: str) -> bool:
    """Short strings that read like a file path (the error then says why paths are refused)."""
    return len(text) < 4096 and bool(_PATH_LIKE.search(text.strip()))


def b64decode(text: str, config: ServerConfig, param: str) -> bytes:
    """Standard or URL-safe base64, padding optional; 413 before decoding when it would exceed the byte limit."""
    text = "".join(text.split())
    if len(text) * 3 // 4 > config.max_upload_bytes + 3:
        raise too_large(f"'{param}'", len(text) * 3 // 4, config, param)
    if "-" in text or "_" in text:  # the URL-safe alphabet
        text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"'{param}' is not valid base64", param) from None


def _data_url(text: str, config: ServerConfig, param: str) -> bytes:
    header, sep, payload = text.partition(",")
    media = header[5:].split(";")[0].strip().lower()
    if not sep or ";base64" not in header.lower():
        raise APIError(400, f"'{param}': data URLs must be base64-encoded (data:image/png;base64,...)", param)
    if media and not (media.startswith("image/") or media == "application/octet-stream"):
        raise APIError(400, f"'{param}': the data URL's media type is {media!r}, not an image", param)
    return b64decode(payload, config, param)


def image_bytes_from_string(value: str, config: ServerConfig, param: str = "image") -> bytes:
    """The bytes of an image given as a data URL, plain base64 or (when enabled) an http(s) URL."""
    text = value.strip()
    if not text:
        raise APIError(400, f"'{param}' is empty", param)
    scheme = _SCHEME.match(text[:40])
    if scheme and len(scheme.group(1)) > 1:  # "C:\..." is a Windows path, handled below
        name = scheme.group(1).lower()
        if name == "data":
            return _data_url(text, config, param)
        if name in ("http", "https"):
            if not config.allow_url_fetch:
                raise APIError(400, f"'{param}': fetching image URLs is disabled on this server (start it with "
                                    f"--allow-url-fetch); {SEND_BYTES}", param)
            return fetch_url(text, config, param)
        raise APIError(400, f"'{param}': {name}: URLs are not accepted (the server never reads files from its own "
                            f"disk); {SEND_BYTES}", param)
    try:
        return b64decode(text, config, param)
    except APIError as e:
        if e.status == 400 and looks_like_path(text):
            raise APIError(400, PATH_ERROR.format(param), param) from None
        raise


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.lower().startswith(("http://", "https://")):
            raise urllib.error.URLError(f"redirect to a non-http(s) URL: {newurl[:100]}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_url(url: str, config: ServerConfig, param: str) -> bytes:
    """An http(s) URL's bytes (redirects to other schemes refused), at most the byte limit."""
    opener = urllib.request.build_opener(_HTTPOnlyRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "mlx-blip2-server"})
    try:
        with opener.open(request, timeout=config.url_fetch_timeout) as response:
            data = response.read(config.max_upload_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise APIError(400, f"'{param}': could not fetch the image URL: {reason}", param) from None
    if len(data) > config.max_upload_bytes:
        raise too_large(f"the image at '{param}'", len(data), config, param)
    return data


def resize_spec(pipeline) -> dict | None:
    """The processor's resize, done while decoding so that the model thread's own resize is a copy (PIL returns a
    copy for a same-size resize): the same pixels, with the expensive part off the model thread."""
    ip = getattr(getattr(pipeline, "processor", None), "image_processor", None)
    if ip is None or not getattr(ip, "do_resize", False) or not isinstance(getattr(ip, "size", None), dict):
        return None
    return {"width": ip.size["width"], "height": ip.size["height"], "resample": ip.resample}


def decode_image(data: bytes, config: ServerConfig, param: str = "image", size: dict | None = None):
    """Image bytes -> an RGB PIL image (resized to ``size`` when given); 413 over a limit, 400 when undecodable."""
    from PIL import Image

    try:
        rgb = open_image(bytes(data), name=f"'{param}'", max_bytes=config.max_upload_bytes,
                         max_pixels=config.max_pixels)
    except ImageLoadError as e:
        raise image_error(e, param) from None
    if size is not None and rgb.size != (size["width"], size["height"]):
        rgb = rgb.resize((size["width"], size["height"]), resample=Image.Resampling(size["resample"]),
                         reducing_gap=None)
    return rgb


def load_image(source: bytes | str, config: ServerConfig, param: str = "image", size: dict | None = None):
    """An uploaded file's bytes or a request string (base64, data URL, URL) -> a decoded, checked RGB image."""
    if isinstance(source, (bytes, bytearray)):
        return decode_image(source, config, param, size)
    blob = image_bytes_from_string(source, config, param)
    try:
        return decode_image(blob, config, param, size)
    except APIError as e:
        if e.status == 400 and looks_like_path(source):  # "/etc/passwd" is valid base64, of garbage
            raise APIError(400, PATH_ERROR.format(param), param) from None
        raise


def image_sources(data: dict, uploads: dict, names=("image",), many: bool = False, most: int = 256) -> list:
    """[(field, bytes or string)] of a request's images, uploads first; at least one, exactly one unless ``many``."""
    sources = []
    for name in names:
        sources += [(name, blob) for blob in uploads.get(name, [])]
        value = data.get(name)
        if value is not None:
            sources += [(name, item) for item in (value if isinstance(value, list) else [value])]
    if not sources:
        raise APIError(400, f"'{names[0]}' is required: a multipart file upload, base64 or a data URL", names[0])
    if not many and len(sources) > 1:
        raise APIError(400, f"send one image ('{names[0]}'), got {len(sources)}", names[0])
    if len(sources) > most:
        raise APIError(400, f"at most {most} images per request", names[0])
    return sources
