"""The batched engine under every generation entry point: rows of (image, prompt) in, completions out.

The pipelines, library captioning and the server call it; nothing else builds processor inputs, generates and
decodes text. It opens each image one way (:func:`mlx_blip2.images.open_image`), tokenizes and detokenizes, encodes
each distinct image once, checks the context length for every caller, and supports ``should_stop`` and streaming.
Decoding itself, on tensors, is :mod:`mlx_blip2.generation`'s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np

from ..images import open_image
from ..generation.decoding import CancellableRunner, generate_step
from ..generation.generate import decode, prepare_inputs, start_decoding
from ..generation.options import GenerationOptions, eos_id_list


class ContextLengthError(ValueError):
    """Prompt plus new tokens exceed the language model's positions."""

    param = "max_new_tokens"


@dataclass
class Row:
    """One generation: exactly one of ``image`` (anything ``open_image`` takes), ``pixel_values`` (preprocessed,
    (C, H, W)) or ``image_features`` (from ``encode``, (Q, D)); and a prompt (None: generate from the image alone).
    Rows whose ``image`` is the same object or path are encoded once."""

    image: Any = None
    prompt: str | None = None
    pixel_values: np.ndarray | None = None
    image_features: mx.array | None = None


@dataclass
class Completion:
    text: str
    ids: list[int]  # new tokens, up to and including the end-of-sequence token
    finish_reason: str  # "stop" (end of sequence) or "length" (max_new_tokens)
    prompt_tokens: int  # the language model's prompt, query tokens included
    generation_tokens: int


@dataclass
class GenerationResponse:
    """One streamed piece of text; the last one also carries the statistics (as mlx-lm reports them)."""

    text: str
    token: int | None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory: float = 0.0  # GB


def _image_key(row: Row):
    if row.image_features is not None:
        return ("features", id(row))
    if row.pixel_values is not None:  # the same array on several rows (an ask's questions) is encoded once
        return ("pixels", id(row.pixel_values))
    return ("path", str(row.image)) if isinstance(row.image, str) else ("object", id(row.image))


class Engine:
    """A generation model and its processor. ``eos_token_ids``: where generation stops (default: the model's)."""

    def __init__(self, model, processor, eos_token_ids: Sequence[int] | None = None):
        self.model, self.processor = model, processor
        if eos_token_ids is None:
            eos_token_ids = eos_id_list(model.config.text_config.eos_token_id)
        self.eos_token_ids = list(eos_token_ids)
        # InstructBLIP's Q-Former reads the instruction, so an image's features depend on the prompt.
        self.features_depend_on_prompt = bool(getattr(model, "features_depend_on_prompt", False))

    # --- images ----------------------------------------------------------------------------------------------------

    def preprocess(self, image) -> np.ndarray:
        """One image (path, bytes, PIL image, array) -> float32 (C, H, W); thread-safe."""
        return self.processor.image_processor.preprocess(open_image(image))

    def encode(self, pixel_values, **text_inputs) -> mx.array:
        """Projected query outputs (B, Q, D) of preprocessed images: (B, C, H, W) or a list of (C, H, W)."""
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = np.stack(pixel_values)
        return self.model.encode_images(pixel_values, **text_inputs)

    def _features(self, rows: list[Row], text: dict) -> mx.array:
        """Each row's image features, encoding each distinct image (or image and prompt) once."""
        extra = {k: v for k, v in text.items() if k.startswith("qformer_")}
        keys = [(_image_key(r), r.prompt) if self.features_depend_on_prompt else _image_key(r) for r in rows]
        first = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        todo = [i for i in first.values() if rows[i].image_features is None]
        encoded = {}
        if todo:
            pixels = [rows[i].pixel_values if rows[i].pixel_values is not None else self.preprocess(rows[i].image)
                      for i in todo]
            sub = {k: v[np.asarray(todo)] for k, v in extra.items()}
            feats = self.encode(pixels, **sub)
            encoded = {i: feats[j] for j, i in enumerate(todo)}
        out = []
        for k, r in zip(keys, rows):
            f = r.image_features if r.image_features is not None else encoded[first[k]]
            out.append(f[0] if f.ndim == 3 else f)
        return mx.stack(out)

    # --- text ------------------------------------------------------------------------------------------------------

    def _text(self, prompts: list[str | None]) -> dict:
        """Prompt ids with the image tokens, or {} when no row has a prompt (generate from BOS, as transformers)."""
        if all(p is None for p in prompts):
            return {}
        if any(p is None for p in prompts):
            raise ValueError("give every row a prompt, or none")
        return self.processor.encode_text(prompts, padding=True)

    def prompt_lengths(self, text: dict, batch: int) -> list[int]:
        q = self.model.config.num_query_tokens
        if not text:
            return [q + 1] * batch  # (image tokens,) BOS
        lengths = np.asarray(text["attention_mask"]).sum(axis=1).tolist()
        return [n + q if self.model.config.image_token_index is None else n for n in lengths]

    def check_context(self, prompt_tokens: Sequence[int], max_new_tokens: int) -> None:
        """Decoder-only models have a fixed number of positions: prompt + new tokens must fit."""
        config = self.model.config
        if not config.use_decoder_only_language_model:
            return
        limit = getattr(config.text_config, "max_position_embeddings", None)
        longest = max(prompt_tokens)
        if limit and longest + max_new_tokens > limit:
            raise ContextLengthError(
                f"the prompt ({longest} tokens with the image's) plus max_new_tokens ({max_new_tokens}) exceed the "
                f"model's {limit} positions; shorten the text or lower max_new_tokens")

    def _options(self, options: GenerationOptions) -> GenerationOptions:
        changes = {}
        if options.eos_token_id is None:
            changes["eos_token_id"] = self.eos_token_ids
        if options.pad_token_id is None and self.processor.tokenizer.pad_token_id is not None:
            changes["pad_token_id"] = self.processor.tokenizer.pad_token_id
        return options.replace(**changes) if changes else options

    # --- generation ------------------------------------------------------------------------------------------------

    def generate(self, rows: Sequence[Row], options: GenerationOptions,
                 should_stop: Callable[[], bool] | None = None) -> list[list[Completion]]:
        """``options.num_return_sequences`` completions for each row, in one model call."""
        rows = list(rows)
        if not rows:
            return []
        options = self._options(options)
        text = self._text([r.prompt for r in rows])
        lengths = self.prompt_lengths(text, len(rows))
        self.check_context(lengths, options.max_new_tokens)
        features = self._features(rows, text)
        inputs = prepare_inputs(self.model, input_ids=text.get("input_ids"), attention_mask=text.get("attention_mask"),
                                image_features=features)
        ids = decode(self.model, inputs, options, should_stop).tolist()
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        eos = set(eos_id_list(options.eos_token_id))
        n = options.num_return_sequences
        out = []
        for i, (row_ids, row_text) in enumerate(zip(ids, texts)):
            end = next((j + 1 for j, t in enumerate(row_ids) if t in eos), None)
            kept = row_ids[:end] if end else row_ids
            out.append(Completion(row_text.strip(), kept, "stop" if end else "length", lengths[i // n], len(kept)))
        return [out[i * n:(i + 1) * n] for i in range(len(rows))]

    def stream(self, row: Row, options: GenerationOptions,
               should_stop: Callable[[], bool] | None = None) -> Iterator[GenerationResponse]:
        """The text of one row's generation piece by piece as tokens arrive (greedy or sampling)."""
        from mlx_lm.tokenizer_utils import TokenizerWrapper

        if options.num_beams != 1:
            raise ValueError("streaming needs num_beams=1: beam search only knows its text at the end")
        options = self._options(options)
        tic = time.perf_counter()
        text = self._text([row.prompt])
        (prompt_tokens,) = self.prompt_lengths(text, 1)
        self.check_context([prompt_tokens], options.max_new_tokens)
        inputs = prepare_inputs(self.model, input_ids=text.get("input_ids"), attention_mask=text.get("attention_mask"),
                                image_features=self._features([row], text))
        runner, sampler, processors = start_decoding(self.model, inputs, options)
        if should_stop is not None:
            runner = CancellableRunner(runner, should_stop)
        mx.eval(runner.first_logits)
        prompt_tps = prompt_tokens / (time.perf_counter() - tic)
        tok = self.processor.tokenizer
        detokenizer = TokenizerWrapper(tok).detokenizer
        detokenizer.reset()
        # Skipped, as batch_decode(skip_special_tokens=True) does (added special tokens such as <image> included).
        special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
        tic, n, reason = time.perf_counter(), 0, "length"
        for n, (token,) in enumerate(generate_step(runner, max_new_tokens=options.max_new_tokens, sampler=sampler,
                                                   processors=processors, pad_token_id=0), start=1):
            if token in processors.eos_ids:
                reason = "stop"
                break
            if token in special:
                continue
            detokenizer.add_token(token)
            segment = detokenizer.last_segment  # reading it consumes it
            if segment:
                yield GenerationResponse(segment, token)
        detokenizer.finalize()
        elapsed = max(time.perf_counter() - tic, 1e-9)
        yield GenerationResponse(detokenizer.last_segment, None, reason, prompt_tokens, prompt_tps, n, n / elapsed,
                                 mx.get_peak_memory() / 1e9)


def stream_generate(model, processor, image, prompt: str | None = None, eos_token_id=None,
                    **options) -> Iterator[GenerationResponse]:
    """Stream one image's generation (see :meth:`Engine.stream`); options as ``generate``."""
    engine = Engine(model, processor, None if eos_token_id is None else eos_id_list(eos_token_id))
    yield from engine.stream(Row(image=image, prompt=prompt), GenerationOptions(**options))
