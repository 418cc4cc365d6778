"""Decoding strategies with transformers' semantics: greedy, sampling and beam search over a KV cache.

Each greedy or sampling step builds one graph and queues the next with ``mx.async_eval`` before the current token is
read, so the host never waits on the device between steps (as mlx-lm does). Beam search keeps its bookkeeping on
the host, in the order transformers' ``_beam_search`` does it, so that the ids are identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

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


def make_runner(model, inputs_embeds: mx.array, attention_mask: mx.array):
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


def beam_search(runner, *, num_beams: int, max_new_tokens: int, processors: LogitsProcessors,
                pad_token_id: int | None, length_penalty: float = 1.0, early_stopping: bool | str = False,
                num_return_sequences: int = 1) -> list[list[int]]:
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
