"""Token generation for BLIP-2: greedy, sampling and beam search, with transformers' semantics.

The image is encoded once; the language model then runs a lazy decode loop over a KV cache. Each greedy or
sampling step builds one graph and queues the next with ``mx.async_eval`` before the current token is read, so the
host never waits on the device between steps (as mlx-lm does). Beam search keeps its bookkeeping on the host, in
the order transformers' ``_beam_search`` does it, so that the ids are identical.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache
from mlx_lm.sample_utils import make_sampler

from .blip2 import Blip2Model, check_pixel_values

NEG_INF = -float("inf")


# --- the language model behind one interface -------------------------------------------------------------------


class DecoderOnlyRunner:
    """OPT: the prompt embeddings are prefilled into the cache, then one token per step."""

    def __init__(self, lm, inputs_embeds: mx.array, attention_mask: mx.array):
        self.lm = lm
        self.cache = [KVCache() for _ in lm.layers]
        self.mask = attention_mask
        self.has_padding = not bool(attention_mask.all().item())
        # The next token's position is the number of kept tokens before it; padding takes no position.
        self.next_position = attention_mask.astype(mx.int32).sum(axis=1, keepdims=True)
        self.first_logits = lm(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=self.cache, logits_to_keep=1
        )[:, -1]

    def __call__(self, tokens: mx.array) -> mx.array:
        if self.has_padding:
            self.mask = mx.concatenate([self.mask, mx.ones((self.mask.shape[0], 1), self.mask.dtype)], axis=1)
        embeds = self.lm.get_input_embeddings()(tokens[:, None])
        logits = self.lm(
            inputs_embeds=embeds,
            attention_mask=self.mask if self.has_padding else None,
            cache=self.cache,
            position_ids=self.next_position,
        )
        self.next_position = self.next_position + 1
        return logits[:, -1]

    def select(self, rows: mx.array) -> None:
        """Keep (and reorder, repeat) batch rows: beam search's cache reordering."""
        for c in self.cache:
            c.keys, c.values = c.keys[rows], c.values[rows]
        self.mask, self.next_position = self.mask[rows], self.next_position[rows]


class EncoderDecoderRunner:
    """T5: the prompt is encoded once; the decoder starts from ``decoder_start_token_id``."""

    def __init__(self, lm, inputs_embeds: mx.array, attention_mask: mx.array):
        self.lm = lm
        self.encoder_mask = attention_mask
        self.encoder_states = lm.encode(inputs_embeds, attention_mask)
        self.cache = lm.make_cache()
        start = mx.full((inputs_embeds.shape[0],), lm.config.decoder_start_token_id, dtype=mx.int32)
        self.first_logits = self(start)

    def __call__(self, tokens: mx.array) -> mx.array:
        return self.lm.decode(tokens[:, None], self.encoder_states, self.encoder_mask, self.cache)[:, -1]

    def select(self, rows: mx.array) -> None:
        self.encoder_states, self.encoder_mask = self.encoder_states[rows], self.encoder_mask[rows]
        for c in self.cache:
            c.select(rows)


class GenerationCancelled(Exception):
    """Raised between decode steps when ``generate``'s ``should_stop()`` says so (a server's client went away)."""


class CancellableRunner:
    """A runner that checks ``should_stop()`` before every decode step."""

    def __init__(self, runner, should_stop: Callable[[], bool]):
        self.runner, self.should_stop = runner, should_stop

    def __call__(self, tokens: mx.array) -> mx.array:
        if self.should_stop():
            raise GenerationCancelled()
        return self.runner(tokens)

    def __getattr__(self, name):
        return getattr(self.runner, name)


def make_runner(model: Blip2Model, inputs_embeds: mx.array, attention_mask: mx.array):
    lm = model.language_model
    if model.config.use_decoder_only_language_model:
        return DecoderOnlyRunner(lm, inputs_embeds, attention_mask)
    return EncoderDecoderRunner(lm, inputs_embeds, attention_mask)


# --- logits processors (transformers' semantics: they see the prompt ids and the generated ids) ----------------


@dataclass
class LogitsProcessors:
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    eos_ids: Sequence[int] = ()
    history: list[list[int]] = field(default_factory=list)  # per row: prompt ids (as transformers counts them)

    @property
    def needs_history(self) -> bool:
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0

    def __call__(self, scores: mx.array, n_generated: int) -> mx.array:
        if self.repetition_penalty != 1.0 and any(self.history):
            width = max(len(h) for h in self.history)
            # Pad ragged histories with each row's first id: repeating an id already penalised changes nothing.
            ids = mx.array([h + [h[0]] * (width - len(h)) if h else [0] * width for h in self.history])
            picked = mx.take_along_axis(scores, ids, axis=1)
            picked = mx.where(picked < 0, picked * self.repetition_penalty, picked / self.repetition_penalty)
            has = mx.array([bool(h) for h in self.history])[:, None]
            scores = mx.put_along_axis(scores, ids, mx.where(has, picked, mx.take_along_axis(scores, ids, 1)), 1)
        if self.no_repeat_ngram_size > 0:
            banned = [self._banned(h) for h in self.history]
            if any(banned):
                rows = [r for r, b in enumerate(banned) for _ in b]
                cols = [c for b in banned for c in b]
                mask = np.zeros(scores.shape, dtype=bool)
                mask[rows, cols] = True
                scores = mx.where(mx.array(mask), NEG_INF, scores)
        if n_generated < self.min_new_tokens and self.eos_ids:
            scores[:, mx.array(list(self.eos_ids))] = NEG_INF
        return scores

    def _banned(self, ids: list[int]) -> list[int]:
        n = self.no_repeat_ngram_size
        if len(ids) + 1 < n:
            return []
        prefix = tuple(ids[len(ids) - n + 1:]) if n > 1 else ()
        return [ids[i + n - 1] for i in range(len(ids) - n + 1) if tuple(ids[i:i + n - 1]) == prefix]


# --- greedy and sampling ---------------------------------------------------------------------------------------


def generate_step(
    runner,
    *,
    max_new_tokens: int,
    sampler: Callable[[mx.array], mx.array],
    processors: LogitsProcessors,
    pad_token_id: int,
) -> Iterator[list[int]]:
    """Yield the batch's next tokens (a list of B ids) until every row ended or ``max_new_tokens`` were made.

    Rows that ended get ``pad_token_id``, as transformers does.
    """
    eos = mx.array(list(processors.eos_ids) or [-1])
    B = runner.first_logits.shape[0]

    def step(logits: mx.array, finished: mx.array, n: int):
        logits = processors(logits.astype(mx.float32), n)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tokens = mx.where(finished, pad_token_id, sampler(logprobs))
        return tokens, finished | (tokens[:, None] == eos[None]).any(axis=1)

    tokens, finished = step(runner.first_logits, mx.zeros((B,), dtype=mx.bool_), 0)
    mx.async_eval(tokens, finished)
    for n in range(1, max_new_tokens + 1):
        if processors.needs_history:  # these processors read the ids on the host, so no step can run ahead
            for h, t in zip(processors.history, tokens.tolist()):
                h.append(t)
        if n < max_new_tokens:
            next_tokens, next_finished = step(runner(tokens), finished, n)
            mx.async_eval(next_tokens, next_finished)
        yield tokens.tolist()
        if n == max_new_tokens or finished.all().item():
            return
        tokens, finished = next_tokens, next_finished


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


# --- beam search -----------------------------------------------------------------------------------------------


def beam_search(
    runner,
    *,
    num_beams: int,
    max_new_tokens: int,
    processors: LogitsProcessors,
    pad_token_id: int | None,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
) -> list[list[int]]:
    """Beam search as transformers 4.50+ runs it; returns num_return_sequences rows per input, new tokens only."""
    eos = list(processors.eos_ids)
    B = runner.first_logits.shape[0]
    K = max(2, 1 + len(eos)) * num_beams  # candidates kept per step, so that num_beams stay open after EOS hits
    fill = pad_token_id if pad_token_id else (eos[0] if eos else -1)  # transformers' `pad or eos[0]`
    runner.select(mx.repeat(mx.arange(B), num_beams))
    logits = mx.repeat(runner.first_logits, num_beams, axis=0)
    if processors.history:
        processors.history = [list(h) for h in processors.history for _ in range(num_beams)]

    running = np.full((B, num_beams, max_new_tokens), fill, dtype=np.int64)
    running_scores = np.zeros((B, num_beams), dtype=np.float32)
    running_scores[:, 1:] = -1e9  # all beams start equal: only the first may expand
    finished = np.full((B, num_beams, max_new_tokens), fill, dtype=np.int64)
    finished_scores = np.full((B, num_beams), -1e9, dtype=np.float32)
    finished_len = np.zeros((B, num_beams), dtype=np.int64)
    is_sent_finished = np.zeros((B, num_beams), dtype=bool)
    improvable = np.ones((B,), dtype=bool)
    top_mask = np.arange(K) < num_beams

    for n in range(max_new_tokens):
        logits = logits.astype(mx.float32)
        logprobs = processors(logits - mx.logsumexp(logits, axis=-1, keepdims=True), n)
        logprobs = np.array(logprobs).reshape(B, num_beams, -1) + running_scores[:, :, None]
        V = logprobs.shape[-1]
        flat = logprobs.reshape(B, -1)
        top = np.argsort(-flat, axis=1, kind="stable")[:, :K]
        top_scores = np.take_along_axis(flat, top, axis=1)
        beam, token = top // V, top % V
        cand = np.take_along_axis(running, beam[:, :, None], axis=1)
        cand[:, :, n] = token
        cand_len = np.full((B, K), n + 1)
        hits = np.isin(token, eos) | (n + 1 >= max_new_tokens)

        # Open beams for the next step: the best K candidates that did not just finish.
        open_scores = top_scores + hits * -1e9
        keep = np.argsort(-open_scores, axis=1, kind="stable")[:, :num_beams]
        running = np.take_along_axis(cand, keep[:, :, None], axis=1)
        running_scores = np.take_along_axis(open_scores, keep, axis=1)
        source_beam = np.take_along_axis(beam, keep, axis=1)

        # Finished hypotheses: only the top num_beams candidates count, scored with the length penalty.
        just_finished = hits & top_mask[None, :]
        scores = top_scores / ((n + 1) ** length_penalty)
        scores = scores + (is_sent_finished.all(axis=1, keepdims=True) & (early_stopping is True)) * -1e9
        scores = scores + (~improvable[:, None]) * -1e9 + (~just_finished) * -1e9
        merged_scores = np.concatenate([finished_scores, scores], axis=1)
        best = np.argsort(-merged_scores, axis=1, kind="stable")[:, :num_beams]
        finished = np.take_along_axis(np.concatenate([finished, cand], axis=1), best[:, :, None], axis=1)
        finished_scores = np.take_along_axis(merged_scores, best, axis=1)
        finished_len = np.take_along_axis(np.concatenate([finished_len, cand_len], axis=1), best, axis=1)
        is_sent_finished = np.take_along_axis(np.concatenate([is_sent_finished, just_finished], axis=1), best, axis=1)

        # Can an open beam still beat the worst finished one? (transformers' early-stopping heuristic)
        length = (max_new_tokens if early_stopping == "never" and length_penalty > 0 else n + 1)
        best_possible = running_scores[:, 0] / (length ** length_penalty)
        worst = np.where(is_sent_finished, finished_scores.min(axis=1, keepdims=True), -1e9)
        improvable = improvable & (best_possible[:, None] > worst).any(axis=1)
        done = ~improvable.any() or (is_sent_finished.all() and early_stopping is True) or hits.all()
        if done or n + 1 == max_new_tokens:
            break
        rows = (source_beam + np.arange(B)[:, None] * num_beams).reshape(-1)
        runner.select(mx.array(rows))
        if processors.history:
            processors.history = [processors.history[r] + [int(t)] for r, t in
                                  zip(rows, running[:, :, n].reshape(-1))]
        logits = runner(mx.array(running[:, :, n].reshape(-1)))

    out = finished[:, :num_return_sequences].reshape(B * num_return_sequences, -1)
    length = int(finished_len[:, :num_return_sequences].max())
    return out[:, :length].tolist()


# --- the entry points ------------------------------------------------------------------------------------------


def _eos_ids(model: Blip2Model, eos_token_id) -> list[int]:
    if eos_token_id is None:
        eos_token_id = model.config.text_config.eos_token_id
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


def check_options(max_new_tokens: int = 20, num_beams: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                  top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0, num_return_sequences: int = 1,
                  do_sample: bool = False, **_) -> None:
    """Raise ValueError for generation options out of range (before any work is done)."""
    checks = [
        (max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {max_new_tokens}"),
        (num_beams >= 1, f"num_beams must be >= 1, got {num_beams}"),
        (temperature >= 0, f"temperature must be >= 0, got {temperature}"),
        (0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}"),
        (top_k >= 0, f"top_k must be >= 0, got {top_k}"),
        (0 <= min_p <= 1, f"min_p must be in [0, 1], got {min_p}"),
        (repetition_penalty > 0, f"repetition_penalty must be > 0, got {repetition_penalty}"),
        (1 <= num_return_sequences <= num_beams, "num_return_sequences must be between 1 and num_beams"),
        (not (do_sample and num_beams > 1), "sampling with beams (beam-sample) is not supported"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


@dataclass
class PreparedInputs:
    inputs_embeds: mx.array
    attention_mask: mx.array
    prompt_ids: list[list[int]]  # what transformers' logits processors see as input_ids


def prepare_inputs(model: Blip2Model, pixel_values=None, input_ids=None, attention_mask=None,
                   image_features=None, interpolate_pos_encoding: bool = False) -> PreparedInputs:
    if image_features is None:
        if pixel_values is None:
            raise ValueError("pass pixel_values (or image_features from model.encode_images)")
        pixel_values = check_pixel_values(pixel_values, model.config.vision_config.num_channels)
        image_features = model.encode_images(pixel_values, interpolate_pos_encoding)
    embeds, mask = model.merge_image_features(image_features, input_ids, attention_mask)
    if not model.config.use_decoder_only_language_model:
        prompt = [[model.language_model.config.decoder_start_token_id]] * embeds.shape[0]
    elif model.config.image_token_index is None:
        prompt = [[] for _ in range(embeds.shape[0])]  # transformers 4.45 generated from embeddings alone
    else:
        ids = model.default_input_ids(embeds.shape[0]) if input_ids is None else input_ids
        prompt = np.asarray(ids).tolist()
    return PreparedInputs(embeds, mask, prompt)


def generate(
    model: Blip2Model,
    pixel_values=None,
    input_ids=None,
    attention_mask=None,
    *,
    image_features: mx.array | None = None,
    max_new_tokens: int = 20,
    min_new_tokens: int = 0,
    num_beams: int = 1,
    num_return_sequences: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    interpolate_pos_encoding: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> mx.array:
    """Generate new token ids for a batch of images and (optional) prompts; returns (B * num_return_sequences, T).

    Options follow transformers' ``generate``: greedy by default, beam search with ``num_beams > 1``, sampling
    (temperature, top-k, top-p, min-p; reproducible with ``seed``) with ``do_sample=True``. ``image_features`` (from
    ``model.encode_images``) may replace ``pixel_values`` so that several prompts on one image encode it once.
    ``should_stop()``, checked before every decode step, cancels the generation with ``GenerationCancelled``.
    """
    check_options(max_new_tokens, num_beams, temperature, top_p, top_k, min_p, repetition_penalty,
                  num_return_sequences, do_sample)
    inputs = prepare_inputs(model, pixel_values, input_ids, attention_mask, image_features, interpolate_pos_encoding)
    if pad_token_id is None:
        pad_token_id = model.config.text_config.pad_token_id
    runner, sampler, processors = start_decoding(
        model, inputs, eos_token_id=eos_token_id, min_new_tokens=min_new_tokens,
        repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
    )
    if should_stop is not None:
        runner = CancellableRunner(runner, should_stop)
    if num_beams > 1:
        rows = beam_search(runner, num_beams=num_beams, max_new_tokens=max_new_tokens, processors=processors,
                           pad_token_id=pad_token_id, length_penalty=length_penalty, early_stopping=early_stopping,
                           num_return_sequences=num_return_sequences)
        return mx.array(rows, dtype=mx.int32)
    steps = list(generate_step(runner, max_new_tokens=max_new_tokens, sampler=sampler, processors=processors,
                               pad_token_id=pad_token_id or 0))
    return mx.array(steps, dtype=mx.int32).T


def start_decoding(model: Blip2Model, inputs: PreparedInputs, *, eos_token_id, min_new_tokens: int,
                   repetition_penalty: float, no_repeat_ngram_size: int, do_sample: bool, temperature: float,
                   top_k: int, top_p: float, min_p: float, seed: int | None):
    """Prefill the language model and build the sampler and logits processors: (runner, sampler, processors)."""
    processors = LogitsProcessors(min_new_tokens, repetition_penalty, no_repeat_ngram_size,
                                  _eos_ids(model, eos_token_id))
    if processors.needs_history:
        processors.history = inputs.prompt_ids
    sampler = greedy
    if do_sample:
        if seed is not None:
            mx.random.seed(seed)
        sampler = make_sampler(temperature, top_p=top_p, min_p=min_p, top_k=top_k)
    return make_runner(model, inputs.inputs_embeds, inputs.attention_mask), sampler, processors


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


def stream_generate(model: Blip2Model, processor, image, prompt: str | None = None, *, max_new_tokens: int = 20,
                    min_new_tokens: int = 0, num_beams: int = 1, do_sample: bool = False, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                    no_repeat_ngram_size: int = 0, seed: int | None = None, eos_token_id=None,
                    pad_token_id: int | None = None) -> Iterator[GenerationResponse]:
    """Yield the text of one image's generation piece by piece as tokens arrive (greedy or sampling).

    Options as :func:`generate`; ``pad_token_id`` is accepted for symmetry and unused (one row never pads).
    """
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from .processing import load_image

    if num_beams != 1:
        raise ValueError("streaming needs num_beams=1: beam search only knows its text at the end")
    check_options(max_new_tokens, num_beams, temperature, top_p, top_k, min_p, repetition_penalty, 1, do_sample)
    tic = time.perf_counter()
    enc = processor(images=[load_image(image)], text=None if prompt is None else [prompt])
    inputs = prepare_inputs(model, enc["pixel_values"], enc.get("input_ids"), enc.get("attention_mask"))
    runner, sampler, processors = start_decoding(
        model, inputs, eos_token_id=eos_token_id, min_new_tokens=min_new_tokens,
        repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
    )
    eos_ids = processors.eos_ids
    mx.eval(runner.first_logits)
    prompt_tokens = inputs.inputs_embeds.shape[1]
    prompt_tps = prompt_tokens / (time.perf_counter() - tic)

    detokenizer = TokenizerWrapper(processor.tokenizer).detokenizer
    detokenizer.reset()
    # Skipped, as batch_decode(skip_special_tokens=True) does (added special tokens such as <image> included).
    tok = processor.tokenizer
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    tic, n, reason = time.perf_counter(), 0, "length"
    for n, (token,) in enumerate(generate_step(runner, max_new_tokens=max_new_tokens, sampler=sampler,
                                               processors=processors, pad_token_id=0), start=1):
        if token in eos_ids:
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
