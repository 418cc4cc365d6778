"""Turn images and prompts into BLIP-2 model inputs (pixel_values, input_ids, attention_mask).

The outputs match transformers' ``Blip2Processor`` with its PIL image backend (``BlipImageProcessorPil``)
value for value, so the MLX model sees the same inputs as the reference. Only numpy and Pillow do the
image work; transformers is used just to load the tokenizer.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

try:  # HEIC/HEIF (iPhone photos) open through the pillow-heif plugin.
    from pillow_heif import register_heif_opener

    register_heif_opener()
    HEIF_SUPPORTED = True
except ImportError:  # pragma: no cover - depends on the environment
    HEIF_SUPPORTED = False

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class ImageLoadError(ValueError):
    """An image file exists but cannot be decoded."""


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


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I") or img.mode == "F":
        img = Image.fromarray(_to_uint8(np.asarray(img)))
    elif img.mode == "La":
        img = img.convert("LA")  # Pillow has no direct La -> RGBA path
    # Transparent pixels become white, as in transformers' convert_to_rgb; plain convert("RGB") would expose
    # whatever colour the transparent pixels happen to hold (often black).
    if any(b in ("A", "a") for b in img.getbands()) or img.info.get("transparency") is not None:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def _array_to_rgb(a: np.ndarray) -> Image.Image:
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


def _open_image(path: Path, draft_size: int | None) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"no such image file: '{path}'")
    try:
        with Image.open(path) as img:
            if draft_size:
                # JPEG only: decode at 1/2, 1/4 or 1/8 scale while both sides stay >= draft_size.
                img.draft("RGB", (draft_size, draft_size))
            return ImageOps.exif_transpose(img)  # always a loaded copy, valid after the file closes
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"cannot read image '{path}': {e}") from e


def load_image(image, draft_size: int | None = None) -> Image.Image:
    """Return `image` (a file path, PIL image or numpy array) as an RGB PIL image.

    Files get their EXIF orientation applied. `draft_size` opts into faster, reduced JPEG decoding; the
    default decodes exactly, as transformers does.
    """
    if isinstance(image, (str, Path)):
        return _pil_to_rgb(_open_image(Path(image), draft_size))
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise TypeError(f"expected an image path, PIL.Image.Image or numpy array, got {type(image).__name__}")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _image_processor_config(directory: Path) -> dict | None:
    # transformers 5 nests the image processor in processor_config.json; older checkpoints keep it separate.
    nested = _read_json(directory / "processor_config.json").get("image_processor")
    return nested if nested is not None else (_read_json(directory / "preprocessor_config.json") or None)


def _check_dir(directory: Path) -> None:
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: '{directory}'")


def _missing_error(directory: Path, missing: list[str]) -> FileNotFoundError:
    return FileNotFoundError(f"checkpoint directory '{directory}' is missing {' and '.join(missing)}")


_NO_IMAGE_CONFIG = "preprocessor_config.json (or an 'image_processor' entry in processor_config.json)"


class Blip2ImageProcessor:
    """Resize, rescale and normalise images into float32 pixel_values of shape (B, 3, H, W)."""

    def __init__(self, do_resize=True, size=None, resample=3, do_rescale=True, rescale_factor=1 / 255,
                 do_normalize=True, image_mean=None, image_std=None, do_convert_rgb=True):
        self.do_resize = do_resize
        size = 384 if size is None else size
        self.size = {"height": size, "width": size} if isinstance(size, int) else dict(size)
        if set(self.size) != {"height", "width"}:
            raise ValueError(f"size must have 'height' and 'width' keys, got {self.size}")
        self.resample = int(resample)
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean if image_mean is not None else OPENAI_CLIP_MEAN)
        self.image_std = list(image_std if image_std is not None else OPENAI_CLIP_STD)
        # Kept for config round-trips only: images are always converted, as the vision model needs 3 channels.
        self.do_convert_rgb = do_convert_rgb

    @classmethod
    def from_dict(cls, config: dict) -> Blip2ImageProcessor:
        known = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in config.items() if k in known})

    @classmethod
    def from_pretrained(cls, directory) -> Blip2ImageProcessor:
        directory = Path(directory)
        _check_dir(directory)
        config = _image_processor_config(directory)
        if config is None:
            raise _missing_error(directory, [_NO_IMAGE_CONFIG])
        return cls.from_dict(config)

    def preprocess(self, image) -> np.ndarray:
        """One image (anything `load_image` takes) -> float32 (3, H, W). Thread-safe."""
        img = load_image(image)
        if self.do_resize:
            h, w = self.size["height"], self.size["width"]
            img = img.resize((w, h), resample=Image.Resampling(self.resample), reducing_gap=None)
        x = np.asarray(img)
        # float64 multiply then float32, then float32 normalise: the same rounding steps as transformers.
        x = (x.astype(np.float64) * self.rescale_factor if self.do_rescale else x).astype(np.float32)
        if self.do_normalize:
            x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def __call__(self, images) -> dict:
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("got an empty list of images")
        arrays = [self.preprocess(im) for im in images]
        if len({a.shape for a in arrays}) > 1:
            raise ValueError("images end up with different sizes; enable do_resize to batch them")
        return {"pixel_values": np.stack(arrays)}


class Blip2Processor:
    """Image processor + tokenizer, with BLIP-2's query-token placeholders prepended to the prompt."""

    def __init__(self, image_processor: Blip2ImageProcessor, tokenizer, num_query_tokens: int | None = None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.num_query_tokens = num_query_tokens
        token = getattr(tokenizer, "image_token", None)
        if token is None:
            # Older tokenizers lack "<image>"; adding it (as transformers does) gives it the id the model expects.
            from tokenizers import AddedToken

            token = "<image>"
            tokenizer.add_tokens([AddedToken(token, normalized=False, special=True)], special_tokens=True)
        self.image_token = str(token)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    @classmethod
    def from_pretrained(cls, directory) -> Blip2Processor:
        directory = Path(directory)
        _check_dir(directory)
        image_config = _image_processor_config(directory)
        missing = [] if image_config is not None else [_NO_IMAGE_CONFIG]
        if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
            missing.append(" or ".join(_TOKENIZER_FILES))
        if missing:
            raise _missing_error(directory, missing)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        num_query_tokens = _read_json(directory / "processor_config.json").get("num_query_tokens")
        return cls(Blip2ImageProcessor.from_dict(image_config), tokenizer, num_query_tokens)

    def __call__(self, images=None, text=None, padding=False, max_length=None, truncation=None,
                 return_tensors="np") -> dict:
        if images is None and text is None:
            raise ValueError("pass images, text, or both")
        if return_tensors not in ("np", None):
            raise ValueError(f"return_tensors must be 'np' or None, got {return_tensors!r}")
        out = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else text
            if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
                raise TypeError(f"text must be a str or a non-empty list of str, got {type(text).__name__}")
            if max_length is not None and self.num_query_tokens is not None:
                # max_length budgets the image tokens too. transformers subtracts them even for text-only calls.
                max_length -= self.num_query_tokens
            enc = self.tokenizer(list(texts), padding=padding, truncation=truncation, max_length=max_length,
                                 return_token_type_ids=False, return_attention_mask=True)
            ids, mask = enc["input_ids"], enc["attention_mask"]
            if images is not None and self.num_query_tokens is not None:
                # Image tokens go in front of everything, BOS and any left padding included, and are never
                # truncated: the model overwrites them with the Q-Former outputs.
                n = self.num_query_tokens
                ids = [[self.image_token_id] * n + list(row) for row in ids]
                mask = [[1] * n + list(row) for row in mask]
            if return_tensors == "np":
                if len({len(row) for row in ids}) > 1:
                    raise ValueError("prompts tokenise to different lengths; pass padding=True to batch them")
                ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
            out.update(input_ids=ids, attention_mask=mask)
        if images is not None:
            out.update(self.image_processor(images))
        return out

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Decode rows of token ids (list of lists, numpy or mlx array)."""
        rows = [np.asarray(row).tolist() for row in sequences]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=skip_special_tokens, **kwargs)
