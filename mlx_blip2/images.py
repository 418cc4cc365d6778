"""One way to open an image: from a path, bytes, a PIL image or an array, to an RGB PIL image.

Every entry point (the processor, library captioning, the photo index, the server) opens images here, so that the
same file gives the same pixels, and so the same caption, from the CLI, from Python and from the server. Files are
decoded at full size, as transformers does: a reduced-size JPEG decode changes the processor's output.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, features

from .files import IMAGE_EXTENSIONS, RAW_EXTENSIONS, is_image_path, is_raw_path  # noqa: F401 (public here too)

try:  # HEIC/HEIF (iPhone photos) open through the pillow-heif plugin.
    from pillow_heif import register_heif_opener

    register_heif_opener()
    HEIF_SUPPORTED = True
except ImportError:  # pragma: no cover - depends on the environment
    HEIF_SUPPORTED = False

AVIF_SUPPORTED = bool(features.check("avif")) if "avif" in features.modules else False

# The formats we decode (Pillow names); the file extensions that select a file live in files.py.
FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "HEIF", "AVIF")
# LibRaw's ``flip`` as the PIL transposition that shows the preview upright.
_RAW_FLIPS = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.ROTATE_90, 6: Image.Transpose.ROTATE_270}
DEFAULT_MAX_PIXELS = 200_000_000  # a 200-megapixel decode is 600 MB of RGB; beyond that, a decompression bomb


class ImageLoadError(ValueError):
    """An image that exists but cannot be decoded, or is refused (format, size)."""


class ImageTooLargeError(ImageLoadError):
    """An image over a limit: ``limit`` is "bytes" or "pixels" (the caller's), or "pillow" (Pillow's own
    decompression-bomb limit, above a larger ``max_pixels``)."""

    def __init__(self, message: str, limit: str = "bytes"):
        super().__init__(message)
        self.limit = limit


def _too_many_pixels(name: str, pixels: int | None, max_pixels: int | None) -> ImageTooLargeError:
    """One message for an image over the pixel limit, whichever check caught it (ours, or Pillow's bomb check)."""
    pillow = 2 * (Image.MAX_IMAGE_PIXELS or 0)  # Pillow refuses above twice its warning threshold
    ours = max_pixels is not None and (not pillow or max_pixels <= pillow)
    limit = max_pixels if ours else pillow
    size = f"{pixels / 1e6:.1f} megapixels" if pixels else "over the limit"
    return ImageTooLargeError(f"{name} is {size}; the limit is {limit / 1e6:g} megapixels"
                              + ("" if ours else " (Pillow's decompression-bomb limit)"),
                              "pixels" if ours else "pillow")


def _bomb_pixels(e: Exception) -> int | None:
    """The pixel count in Pillow's DecompressionBombError message ("Image size (N pixels) exceeds ...")."""
    match = re.search(r"\((\d+) pixels\)", str(e))
    return int(match[1]) if match else None


def available_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in FORMATS if f in Image.OPEN)


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Scale a numeric pixel array to uint8. Pillow's own conversion clips 16-bit data at 255, which
    turns most of a 16-bit image white, so wider types are rescaled instead."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    lo, hi = (a.min(), a.max()) if a.size else (0, 0)
    if np.issubdtype(a.dtype, np.floating):
        if lo < 0 or hi > 255:
            raise ValueError(f"float pixel values must lie in [0, 1] or [0, 255], got [{lo}, {hi}]")
        scale = 255.0 if hi <= 1 else 1.0
    elif np.issubdtype(a.dtype, np.integer):
        if lo < 0 or hi > 65535:
            raise ValueError(f"integer pixel values must lie in [0, 65535], got [{lo}, {hi}]")
        # 16-bit types are always 16-bit data; Pillow decodes some 16-bit files to int32 ("I"), caught by hi > 255.
        scale = 1 / 257 if a.dtype.itemsize == 2 or hi > 255 else 1.0
    else:
        raise TypeError(f"unsupported pixel dtype {a.dtype}")
    return np.round(a.astype(np.float64) * scale).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode as RGB: 16-bit and float scaled, transparency composited on white (transformers'
    convert_to_rgb; a plain convert("RGB") would expose whatever colour transparent pixels hold)."""
    if img.mode.startswith("I") or img.mode == "F":
        img = Image.fromarray(_to_uint8(np.asarray(img)))
    elif img.mode == "La":
        img = img.convert("LA")  # Pillow has no direct La -> RGBA path
    if any(b in ("A", "a") for b in img.getbands()) or img.info.get("transparency") is not None:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def array_to_rgb(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channels-first input
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ValueError(f"expected an image array of shape (H, W), (H, W, 3) or (H, W, 4), got {a.shape}")
    a = _to_uint8(a)
    if a.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(a)).convert("RGB")
    if a.shape[-1] == 4:
        # transformers blends numpy RGBA in floating point and rounds; PIL's integer blend can differ by 1.
        alpha = a[..., 3:] / 255.0
        a = np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a))


def _size(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _format_hint(name: str) -> str:
    ext = os.path.splitext(name.strip("'"))[1].lower()  # labels quote paths
    if ext in (".heic", ".heif", ".hif") and not HEIF_SUPPORTED:
        return " (HEIC/HEIF needs pillow-heif: pip install pillow-heif)"
    if ext == ".avif" and not AVIF_SUPPORTED:
        return " (this Pillow cannot read AVIF: pip install -U pillow)"
    return ""


def _decode(fp, name: str, max_pixels: int | None) -> Image.Image:
    formats = available_formats()
    try:
        img = Image.open(fp, formats=formats)
    except Image.DecompressionBombError as e:
        raise _too_many_pixels(name, _bomb_pixels(e), max_pixels) from None
    except Exception:  # noqa: BLE001 - UnidentifiedImageError, OSError, SyntaxError...: not an image we read
        raise ImageLoadError(f"{name} is not an image in a supported format ({', '.join(formats)})"
                             f"{_format_hint(name)}") from None
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise _too_many_pixels(f"{name} ({w}x{h})", w * h, max_pixels)
    if w < 1 or h < 1:
        raise ImageLoadError(f"{name} has no pixels ({w}x{h})")
    try:
        img.load()
        return to_rgb(ImageOps.exif_transpose(img))
    except Image.DecompressionBombError as e:
        raise _too_many_pixels(name, _bomb_pixels(e), max_pixels) from None
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data, whatever the decoder raises
        raise ImageLoadError(f"{name} could not be decoded ({img.format} data is corrupt or truncated: "
                             f"{str(e)[:120] or type(e).__name__})") from None


def _open_raw(path: str, label: str, max_pixels: int | None) -> Image.Image:
    """A RAW file's embedded preview (the camera's own JPEG or bitmap), read with LibRaw through rawpy: developing
    the sensor data would take seconds and look no better to the model."""
    try:
        import rawpy
    except ImportError:
        raise ImageLoadError(f"{label} is a RAW file; reading RAW files needs rawpy: "
                             "pip install 'mlx-blip2[raw]'") from None
    try:
        with rawpy.imread(path) as raw:
            thumb, flip = raw.extract_thumb(), raw.sizes.flip
    except rawpy.LibRawNoThumbnailError:
        raise ImageLoadError(f"{label} has no embedded preview to read") from None
    except (rawpy.LibRawError, OSError, ValueError) as e:
        raise ImageLoadError(f"{label} is not a readable RAW file ({type(e).__name__}: {str(e)[:120]})") from None
    if thumb.format == rawpy.ThumbFormat.JPEG:
        return _decode(io.BytesIO(thumb.data), f"{label} (its embedded preview)", max_pixels)
    image = array_to_rgb(np.asarray(thumb.data))
    return image.transpose(_RAW_FLIPS[flip]) if flip in _RAW_FLIPS else image


def open_image(image, *, name: str | None = None, max_bytes: int | None = None,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """``image`` (a file path, bytes, PIL image or numpy array) as an RGB PIL image.

    Files and bytes get their EXIF orientation applied and are checked against ``max_bytes`` (before reading) and
    ``max_pixels`` (from the header, before decoding). ``name`` says what the errors call the image (a path by
    default). Raises FileNotFoundError, ImageLoadError (ImageTooLargeError for the limits) or TypeError.
    """
    if isinstance(image, (str, Path)):
        path = os.fspath(image)
        label = name or f"'{path}'"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such image file: '{path}'")
        size = os.path.getsize(path)
        if size == 0:
            raise ImageLoadError(f"{label} is empty (0 bytes)")
        if max_bytes is not None and size > max_bytes:
            raise ImageTooLargeError(f"{label} is {_size(size)}; the limit is {_size(max_bytes)}")
        if is_raw_path(path):
            return _open_raw(path, label, max_pixels)
        try:
            with open(path, "rb") as f:
                return _decode(f, label, max_pixels)
        except OSError as e:
            raise ImageLoadError(f"cannot read image {label}: {e.strerror or e}") from None
    if isinstance(image, (bytes, bytearray, memoryview)):
        label = name or "the image"
        if len(image) == 0:
            raise ImageLoadError(f"{label} is empty (0 bytes)")
        if max_bytes is not None and len(image) > max_bytes:
            raise ImageTooLargeError(f"{label} is {_size(len(image))}; the limit is {_size(max_bytes)}")
        return _decode(io.BytesIO(bytes(image)), label, max_pixels)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        return array_to_rgb(image)
    raise TypeError(f"expected an image path, bytes, PIL.Image.Image or numpy array, got {type(image).__name__}")
