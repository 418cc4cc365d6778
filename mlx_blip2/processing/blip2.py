"""BLIP-2's processor: images and prompts into model inputs (pixel_values, input_ids, attention_mask).

The outputs match transformers' ``Blip2Processor`` with its PIL image backend (``BlipImageProcessorPil``)
value for value, so the MLX model sees the same inputs as the reference. Only numpy and Pillow do the
image work; transformers is used just to load the tokenizer.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..images import ImageLoadError, open_image  # noqa: F401  (re-exported)

# The one way to open an image, under the name transformers users know.
load_image = open_image

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _image_processor_config(directory: Path) -> dict | None:
    # transformers 5 nests the image processor in processor_config.json; older checkpoints keep it separate.
    nested = _read_json(directory / "processor_config.json").get("image_processor")
    return nested if nested is not None else (_read_json(directory / "preprocessor_config.json") or None)


def check_dir(directory: Path) -> None:
    """FileNotFoundError naming a checkpoint directory that does not exist."""
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
        check_dir(directory)
        config = _image_processor_config(directory)
        if config is None:
            raise _missing_error(directory, [_NO_IMAGE_CONFIG])
        return cls.from_dict(config)

    def preprocess(self, image) -> np.ndarray:
        """One image (anything `open_image` takes) -> float32 (3, H, W). Thread-safe."""
        img = open_image(image)
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
        check_dir(directory)
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
            out.update(self.encode_text(texts, padding=padding, max_length=max_length, truncation=truncation,
                                        with_image_tokens=images is not None, return_tensors=return_tensors))
        if images is not None:
            out.update(self.image_processor(images))
        return out

    def encode_text(self, texts, padding=True, max_length=None, truncation=None, with_image_tokens: bool = True,
                    return_tensors="np") -> dict:
        """input_ids and attention_mask of prompts, with the image tokens in front when the checkpoint uses them."""
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"text must be a str or a non-empty list of str, got {type(texts).__name__}")
        if max_length is not None and self.num_query_tokens is not None:
            # max_length budgets the image tokens too. transformers subtracts them even for text-only calls.
            max_length -= self.num_query_tokens
        enc = self.tokenizer(list(texts), padding=padding, truncation=truncation, max_length=max_length,
                             return_token_type_ids=False, return_attention_mask=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if with_image_tokens and self.num_query_tokens is not None:
            # Image tokens go in front of everything, BOS and any left padding included, and are never
            # truncated: the model overwrites them with the Q-Former outputs.
            n = self.num_query_tokens
            ids = [[self.image_token_id] * n + list(row) for row in ids]
            mask = [[1] * n + list(row) for row in mask]
        if return_tensors == "np":
            if len({len(row) for row in ids}) > 1:
                raise ValueError("prompts tokenise to different lengths; pass padding=True to batch them")
            ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
        return {"input_ids": ids, "attention_mask": mask}

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Decode rows of token ids (list of lists, numpy or mlx array)."""
        rows = [np.asarray(row).tolist() for row in sequences]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=skip_special_tokens, **kwargs)
