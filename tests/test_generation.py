"""Sampling statistics, reproducibility and streaming (the id-exact greedy/beam checks live in test_models.py)."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES, REFERENCE
from reference_cases import make_images

from mlx_blip2.pipelines.engine import stream_generate
from mlx_blip2.pipelines import load

ROWS = 2000


@pytest.fixture(scope="module")
def pipe():
    return load(FIXTURES / "tiny-blip2-opt")


@pytest.fixture(scope="module")
def first_step(pipe):
    """The features of one image repeated over many rows, and the exact first-token logits."""
    ref = np.load(REFERENCE / "tiny-blip2-opt.npz")
    features = mx.repeat(pipe.model.encode_images(ref["single_pixel_values"]), ROWS, axis=0)
    ids = np.repeat(ref["single_input_ids"], ROWS, axis=0)
    logits = ref["single_logits"][0, -1].astype(np.float64)
    return features, ids, logits


def sample_first(pipe, first_step, **options):
    features, ids, _ = first_step
    out = pipe.model.generate(input_ids=ids, image_features=features, max_new_tokens=1, do_sample=True, **options)
    return np.array(out)[:, 0]


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_temperature_sampling_follows_the_distribution(pipe, first_step, temperature):
    probs = softmax(first_step[2] / temperature)
    tokens = sample_first(pipe, first_step, temperature=temperature, seed=0)
    freq = np.bincount(tokens, minlength=probs.size) / tokens.size
    # The most likely tokens, and everything else as one bin, each within 4.5 binomial standard deviations.
    top = np.argsort(-probs)[:5]
    bins_p = np.append(probs[top], 1 - probs[top].sum())
    bins_f = np.append(freq[top], 1 - freq[top].sum())
    sigma = np.sqrt(bins_p * (1 - bins_p) / tokens.size)
    assert (np.abs(bins_f - bins_p) < 4.5 * sigma + 1e-3).all(), (bins_f, bins_p)
    # A flatter distribution (higher temperature) spreads over more distinct tokens.
    assert len(set(tokens)) > 5


def test_top_k_and_top_p_restrict_the_support(pipe, first_step):
    logits = first_step[2]
    order = np.argsort(-logits)
    tokens = sample_first(pipe, first_step, top_k=3, seed=1)
    assert set(tokens) <= set(order[:3].tolist()) and len(set(tokens)) > 1
    probs = softmax(logits)
    nucleus = order[: np.searchsorted(np.cumsum(probs[order]), 0.5) + 1]
    tokens = sample_first(pipe, first_step, top_p=0.5, seed=2)
    assert set(tokens) <= set(nucleus.tolist())
    tokens = sample_first(pipe, first_step, min_p=0.5, seed=3)
    assert set(tokens) <= set(np.nonzero(probs >= 0.5 * probs.max())[0].tolist())


def test_sampling_is_reproducible_with_a_seed(pipe):
    image = make_images()[0]
    a = pipe.caption(image, do_sample=True, temperature=1.0, seed=42)
    b = pipe.caption(image, do_sample=True, temperature=1.0, seed=42)
    others = {pipe.caption(image, do_sample=True, temperature=1.0, seed=s) for s in range(5)}
    assert a == b and len(others) > 1


def test_repetition_penalty_discourages_repeats(pipe, first_step):
    features, ids, _ = first_step
    plain = np.array(pipe.model.generate(input_ids=ids[:1], image_features=features[:1], max_new_tokens=12))[0]
    banned = np.array(pipe.model.generate(input_ids=ids[:1], image_features=features[:1], max_new_tokens=12,
                                          no_repeat_ngram_size=1))[0]
    assert len(set(plain.tolist())) < len(plain)  # the random model repeats itself...
    assert len(set(banned.tolist())) == len(banned)  # ...and no_repeat_ngram_size=1 forbids any repeat
    prompt = set(ids[0].tolist())
    assert not prompt & set(banned.tolist())  # transformers counts the prompt ids as history too


def test_invalid_options_are_explained(pipe, first_step):
    features, ids, _ = first_step
    for bad, message in [
        (dict(top_p=0.0), "top_p"), (dict(temperature=-1), "temperature"), (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(num_beams=2, do_sample=True), "beam-sample"),
    ]:
        with pytest.raises(ValueError, match=message):
            pipe.model.generate(input_ids=ids[:1], image_features=features[:1], **bad)


@pytest.mark.parametrize("prompt", [None, "a photo of"])
def test_streaming_text_equals_generated_text(pipe, prompt):
    image = make_images()[2]
    pieces = list(stream_generate(pipe.model, pipe.processor, image, prompt=prompt, max_new_tokens=20,
                                  eos_token_id=pipe.eos_token_ids()))
    final = pieces[-1]
    assert final.finish_reason in ("stop", "length") and final.generation_tokens >= 1
    assert final.prompt_tokens > 0 and final.generation_tps > 0 and final.peak_memory > 0
    text = "".join(p.text for p in pieces).strip()
    assert text == pipe.caption(image, prompt=prompt, max_new_tokens=20, num_beams=1, min_new_tokens=0)
    assert len(pieces) > 2  # it really streamed


def test_streaming_rejects_beams(pipe):
    with pytest.raises(ValueError, match="num_beams=1"):
        next(stream_generate(pipe.model, pipe.processor, make_images()[0], num_beams=3))
