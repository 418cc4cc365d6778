"""The MLX T5 / Flan-T5 against transformers' saved outputs (no torch needed, except the parity test).

The BLIP-2 checkpoint's language model is loaded on its own and fed the ``inputs_embeds`` transformers'
``Blip2ForConditionalGeneration`` gives its T5, so these tests do not depend on the BLIP-2 composition.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES, REFERENCE, rel_error

import mlx_blip2.models.t5 as t5
from mlx_blip2.models.base import ConfigError
from mlx_blip2.models.t5 import FP32_SUFFIXES, T5Config, T5ForConditionalGeneration, clamp_fp16, relative_position_bucket

NAME = "tiny-blip2-flan-t5"
CASES = ["single", "batch"]


def t5_weights(name=NAME) -> tuple[dict, dict]:
    """(text_config dict, language-model weights) of a fixture checkpoint."""
    if name == NAME:
        config = json.loads((FIXTURES / NAME / "config.json").read_text())["text_config"]
        weights = mx.load(str(FIXTURES / NAME / "model.safetensors"))
        weights = {k[len("language_model."):]: v for k, v in weights.items() if k.startswith("language_model.")}
    else:
        config = json.loads((REFERENCE / f"{name}.json").read_text())
        weights = mx.load(str(REFERENCE / f"{name}.safetensors"))
    return config, weights


def load(name=NAME, dtype=mx.float32, keep_fp32=(), config_overrides=None) -> T5ForConditionalGeneration:
    config, weights = t5_weights(name)
    model = T5ForConditionalGeneration(T5Config.from_dict({**config, **(config_overrides or {})}))
    weights = model.sanitize(weights)
    weights = {k: v.astype(mx.float32 if k.endswith(keep_fp32) else dtype) for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return load()


@pytest.fixture(scope="module")
def ref():
    ref = dict(np.load(REFERENCE / f"{NAME}.npz"))
    ref["single_pixel_values"] = ref["pixel_values"][:1]
    ref["batch_pixel_values"] = ref["pixel_values"]
    return ref


def greedy(model, inputs_embeds, attention_mask, max_new_tokens, start=0, eos=1, pad=0) -> np.ndarray:
    """The decoder ids transformers' greedy generate returns: the start token, then new tokens; rows that ended get
    ``pad``; stops once every row has ended."""
    encoded = model.encode(mx.array(inputs_embeds), mx.array(attention_mask))
    cache = model.make_cache()
    tokens = mx.full((inputs_embeds.shape[0], 1), start, dtype=mx.int32)
    finished = mx.zeros((inputs_embeds.shape[0],), dtype=mx.bool_)
    out = [tokens]
    for _ in range(max_new_tokens):
        logits = model.decode(tokens, encoded, mx.array(attention_mask), cache)
        tokens = mx.where(finished, pad, mx.argmax(logits[:, -1], axis=-1).astype(mx.int32))
        finished = finished | (tokens == eos)
        tokens = tokens[:, None]
        out.append(tokens)
        if finished.all().item():
            break
    return np.array(mx.concatenate(out, axis=1))


# --- configuration ------------------------------------------------------------------------------------------------


def test_config_reads_like_transformers():
    hub, _ = t5_weights()
    c = T5Config.from_dict(hub)
    # The Hub's blip2-flan-t5 text_config names dense_act_fn "gelu": transformers then uses exact GELU.
    assert (c.dense_act_fn, c.is_gated_act, c.scale_decoder_outputs) == ("gelu", True, False)
    assert c.hidden_size == c.d_model == 32 and c.num_decoder_layers == 2 and c.bos_token_id == 1
    # Without it, "gated-gelu" means the tanh approximation (transformers' backward-compatibility rule).
    c = T5Config.from_dict({"feed_forward_proj": "gated-gelu", "num_layers": 3})
    assert (c.dense_act_fn, c.is_gated_act, c.scale_decoder_outputs) == ("gelu_new", True, True)
    assert c.num_decoder_layers == 3
    assert T5Config.from_dict({"feed_forward_proj": "gated-silu"}).dense_act_fn == "silu"
    assert T5Config().dense_act_fn == "relu" and not T5Config().is_gated_act
    # transformers 5 saves tie_word_embeddings=true with an explicit scale_decoder_outputs; the latter wins.
    assert not T5Config.from_dict({"tie_word_embeddings": True, "scale_decoder_outputs": False}).scale_decoder_outputs
    assert not T5Config.from_dict({"tie_word_embeddings": False}).scale_decoder_outputs
    with pytest.raises(ConfigError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="gelu-gated")
    with pytest.raises(ConfigError, match="dense_act_fn"):
        T5Config(feed_forward_proj="gated-mish")


def test_relative_position_buckets_match_transformers(ref):
    rel = mx.array(ref["buckets_relative_position"])
    for key in [k for k in ref if k.startswith(("buckets_bidirectional", "buckets_causal"))]:
        _, kind, num_buckets, max_distance = key.split("_")
        ours = relative_position_bucket(rel, kind == "bidirectional", int(num_buckets), int(max_distance))
        np.testing.assert_array_equal(np.array(ours), ref[key], err_msg=key)


# --- the Flan-T5 of the BLIP-2 checkpoint -------------------------------------------------------------------------


def test_weights_keep_a_separate_lm_head(model):
    assert "lm_head" in model
    assert not np.array_equal(np.array(model.lm_head.weight), np.array(model.shared.weight))


@pytest.mark.parametrize("case", CASES)
def test_encoder_matches_transformers(model, ref, case):
    out = model.encode(mx.array(ref[f"{case}_inputs_embeds"]), mx.array(ref[f"{case}_attention_mask"]))
    assert rel_error(out, ref[f"{case}_encoder_last_hidden_state"]) <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(model, ref, case):
    logits = model(inputs_embeds=mx.array(ref[f"{case}_inputs_embeds"]),
                   attention_mask=mx.array(ref[f"{case}_attention_mask"]),
                   decoder_input_ids=mx.array(ref[f"{case}_decoder_input_ids"]))
    assert logits.shape == ref[f"{case}_logits"].shape
    assert rel_error(logits, ref[f"{case}_logits"]) <= 1e-4


def test_encoder_padding_is_masked(model, ref):
    """A padded row encodes and decodes like the same prompt alone (right padding; T5 has relative positions)."""
    embeds, mask = ref["batch_inputs_embeds"], ref["batch_attention_mask"]
    row = int(np.argmin(mask.sum(axis=1)))
    n = int(mask[row].sum())
    assert n < mask.shape[1], "the batch case should hold a padded row"
    dec = mx.array(ref["batch_decoder_input_ids"][row:row + 1])
    full = model(inputs_embeds=mx.array(embeds), attention_mask=mx.array(mask),
                 decoder_input_ids=mx.array(ref["batch_decoder_input_ids"]))[row]
    alone = model(inputs_embeds=mx.array(embeds[row:row + 1, :n]), decoder_input_ids=dec)[0]
    assert rel_error(full, alone) <= 1e-5
    enc_full = model.encode(mx.array(embeds), mx.array(mask))[row, :n]
    assert rel_error(enc_full, model.encode(mx.array(embeds[row:row + 1, :n]))[0]) <= 1e-5


@pytest.mark.parametrize("case", CASES)
def test_cache_equals_no_cache(model, ref, case):
    embeds, mask = mx.array(ref[f"{case}_inputs_embeds"]), mx.array(ref[f"{case}_attention_mask"])
    ids = mx.array(ref[f"{case}_greedy"])  # up to 11 decoder tokens
    encoded = model.encode(embeds, mask)
    full = model.decode(ids, encoded, mask)
    cache = model.make_cache()
    # a 3-token prefill, then one token at a time
    steps = [model.decode(ids[:, :3], encoded, mask, cache)]
    steps += [model.decode(ids[:, t:t + 1], encoded, mask, cache) for t in range(3, ids.shape[1])]
    assert rel_error(mx.concatenate(steps, axis=1), full) <= 1e-5
    assert cache[0].offset == ids.shape[1]
    k, v = cache[0].cross_attention
    assert k.shape == (ids.shape[0], model.config.num_heads, embeds.shape[1], model.config.d_kv) == v.shape


def test_cross_attention_is_computed_once(model, ref):
    """After the first call the cache's cross-attention keys/values are used, not encoder_hidden_states."""
    embeds, mask = mx.array(ref["single_inputs_embeds"]), mx.array(ref["single_attention_mask"])
    ids = mx.array(ref["single_greedy"][:, :4])
    encoded = model.encode(embeds, mask)
    cache = model.make_cache()
    model.decode(ids[:, :3], encoded, mask, cache)
    with_cache = model.decode(ids[:, 3:], mx.zeros_like(encoded), mask, cache)  # the states are not looked at again
    assert rel_error(with_cache, model.decode(ids, encoded, mask)[:, 3:]) <= 1e-5


@pytest.mark.parametrize("case", CASES)
def test_greedy_matches_transformers(model, ref, case):
    expected = ref[f"{case}_greedy"]
    ids = greedy(model, ref[f"{case}_inputs_embeds"], ref[f"{case}_attention_mask"], max_new_tokens=10)
    np.testing.assert_array_equal(ids, expected)
    # transformers' generate returns decoder ids starting with decoder_start_token_id (0).
    assert (expected[:, 0] == 0).all()


def test_select_reorders_cache_rows(model, ref):
    embeds, mask = mx.array(ref["batch_inputs_embeds"]), mx.array(ref["batch_attention_mask"])
    ids = mx.array(ref["batch_greedy"][:, :5])
    encoded = model.encode(embeds, mask)
    cache = model.make_cache()
    model.decode(ids[:, :4], encoded, mask, cache)
    order = mx.array([2, 2, 0])
    for layer in cache:
        layer.select(order)
    step = model.decode(ids[order, 4:], encoded[order], mask[order], cache)
    assert rel_error(step, model.decode(ids, encoded, mask)[order, 4:]) <= 1e-5


def test_lm_head_is_taken_from_weights_when_config_says_tied(ref):
    """transformers 5 saves tie_word_embeddings=true even for Flan-T5; the checkpoint's own lm_head must still win."""
    model = load(config_overrides={"tie_word_embeddings": True, "scale_decoder_outputs": False})
    assert "lm_head" in model
    logits = model(inputs_embeds=mx.array(ref["single_inputs_embeds"]),
                   attention_mask=mx.array(ref["single_attention_mask"]),
                   decoder_input_ids=mx.array(ref["single_decoder_input_ids"]))
    assert rel_error(logits, ref["single_logits"]) <= 1e-4


@pytest.mark.parametrize("head", ["equal", "absent"])
def test_lm_head_equal_to_shared_or_absent_is_tied(head):
    """As transformers' loader: a missing lm_head, or one identical to the embeddings, is tied (whatever the config)."""
    config, weights = t5_weights()
    if head == "equal":
        weights["lm_head.weight"] = weights["shared.weight"]
    else:
        del weights["lm_head.weight"]
    model = T5ForConditionalGeneration(T5Config.from_dict(config))  # Hub config: tie_word_embeddings false
    assert "lm_head" in model
    weights = model.sanitize(weights)
    assert "lm_head" not in model and "lm_head.weight" not in weights
    model.load_weights(list(weights.items()), strict=True)
    h = mx.ones((1, 1, model.config.d_model))
    assert model.config.scale_decoder_outputs is False  # tying the head does not bring back T5's rescale
    logits = model.decode(mx.array([[0]]), h)
    assert logits.shape == (1, 1, model.config.vocab_size)


def test_sanitize_accepts_embed_tokens_names():
    config, weights = t5_weights()
    weights["encoder.embed_tokens.weight"] = weights.pop("shared.weight")
    model = T5ForConditionalGeneration(T5Config.from_dict(config))
    weights = model.sanitize(weights)
    assert "shared.weight" in weights and not any("embed_tokens" in k for k in weights)
    model.load_weights(list(weights.items()), strict=True)


# --- original T5: tied embeddings, rescaled decoder output, ReLU, deeper decoder ----------------------------------


def test_tied_t5_rescales_and_matches_transformers():
    ref = dict(np.load(REFERENCE / "tiny-t5-tied.npz"))
    config, weights = t5_weights("tiny-t5-tied")
    model = T5ForConditionalGeneration(T5Config.from_dict(config))
    assert model.config.scale_decoder_outputs and not model.config.is_gated_act
    weights = model.sanitize(weights)
    # Every duplicate of shared.weight is dropped; the head is shared.as_linear.
    assert not any(k.startswith(("lm_head.", "encoder.embed_tokens", "decoder.embed_tokens")) for k in weights)
    assert "lm_head" not in model and len(model.decoder.block) == 3
    model.load_weights(list(weights.items()), strict=True)
    ids, mask = mx.array(ref["input_ids"]), mx.array(ref["attention_mask"])
    assert rel_error(model.encode(model.shared(ids), mask), ref["encoder_last_hidden_state"]) <= 1e-4
    logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=mx.array(ref["decoder_input_ids"]))
    assert rel_error(logits, ref["logits"]) <= 1e-4
    ids_out = greedy(model, np.array(model.shared(ids)), ref["attention_mask"], max_new_tokens=8, eos=-1)
    np.testing.assert_array_equal(ids_out, ref["greedy"])


# --- float16 ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_fp32", [(), FP32_SUFFIXES], ids=["all-fp16", "wo-fp32"])
def test_float16_is_finite_and_close(ref, keep_fp32):
    model = load(dtype=mx.float16, keep_fp32=keep_fp32)
    embeds = mx.array(ref["batch_inputs_embeds"]).astype(mx.float16)
    logits = model(inputs_embeds=embeds, attention_mask=mx.array(ref["batch_attention_mask"]),
                   decoder_input_ids=mx.array(ref["batch_decoder_input_ids"]))
    assert logits.dtype in (mx.float16, mx.float32)
    assert bool(mx.isfinite(logits).all().item())
    assert rel_error(logits.astype(mx.float32), ref["batch_logits"]) <= 2e-2


def test_clamp_fp16_matches_transformers_rule():
    big = 65504.0
    x = mx.array([1.0, -2.0, 65000.0, float("inf"), -float("inf")], dtype=mx.float16)
    # With an inf anywhere, everything is clamped to +-(max - 1000), which float16 rounds to 64512.
    np.testing.assert_array_equal(np.array(clamp_fp16(x)), np.array([1, -2, 64512, 64512, -64512], np.float16))
    finite = mx.array([1.0, big, -big], dtype=mx.float16)
    np.testing.assert_array_equal(np.array(clamp_fp16(finite)), np.array(finite))  # untouched without an inf
    assert clamp_fp16(mx.array([float("inf")])).item() == float("inf")  # float32 is left alone


def overflowing_model():
    """The fixture in float16 with the first encoder block's feed-forward output blown past float16's range."""
    model = load(dtype=mx.float16)
    ff = model.encoder.block[0].layer[-1].DenseReluDense
    ff.wo.weight = ff.wo.weight * 20000.0  # outputs reach ~4e5; float16 stops at 65504
    return model


def test_float16_overflow_is_clamped(ref, monkeypatch):
    embeds = mx.array(ref["batch_inputs_embeds"]).astype(mx.float16)
    mask = mx.array(ref["batch_attention_mask"])
    model = overflowing_model()
    encoded = model.encode(embeds, mask)
    assert bool(mx.isfinite(encoded).all().item())
    logits = model.decode(mx.array(ref["batch_decoder_input_ids"]), encoded, mask)
    assert bool(mx.isfinite(logits).all().item())
    # Without transformers' guard the same input gives inf/nan.
    monkeypatch.setattr(t5, "clamp_fp16", lambda x: x)
    assert not bool(mx.isfinite(model.encode(embeds, mask)).all().item())


# --- live transformers --------------------------------------------------------------------------------------------


@pytest.mark.parity
def test_parity_with_live_transformers(ref):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.t5.modeling_t5 import T5Attention

    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(FIXTURES / NAME, dtype=torch.float32).eval()
    lm = hf.language_model
    assert lm.config.dense_act_fn == T5Config.from_dict(t5_weights()[0]).dense_act_fn
    embeds, mask = ref["batch_inputs_embeds"], ref["batch_attention_mask"]
    rng = np.random.default_rng(0)
    dec = np.concatenate([np.zeros((3, 1), np.int64), rng.integers(2, 150, size=(3, 6))], axis=1)
    dec_mask = np.ones_like(dec)
    dec_mask[1, 5:] = 0  # a padded decoder row too
    with torch.no_grad():
        expected = lm(inputs_embeds=torch.from_numpy(embeds), attention_mask=torch.from_numpy(mask),
                      decoder_input_ids=torch.from_numpy(dec), decoder_attention_mask=torch.from_numpy(dec_mask))
    model = load()
    logits = model(inputs_embeds=mx.array(embeds), attention_mask=mx.array(mask), decoder_input_ids=mx.array(dec),
                   decoder_attention_mask=mx.array(dec_mask))
    assert rel_error(logits, expected.logits.numpy()) <= 1e-4

    # Bucket boundaries for more configurations than the saved tables.
    rel = torch.arange(-1000, 1001)
    for num_buckets, max_distance in [(32, 128), (64, 256), (6, 7), (10, 100)]:
        for bidirectional in (True, False):
            want = T5Attention._relative_position_bucket(rel, bidirectional, num_buckets, max_distance).numpy()
            got = relative_position_bucket(mx.array(rel.numpy()), bidirectional, num_buckets, max_distance)
            np.testing.assert_array_equal(np.array(got), want)

    # float16 as transformers runs it: wo kept in float32, so the residual stream turns float32 after the first FF.
    hf16 = transformers.Blip2ForConditionalGeneration.from_pretrained(FIXTURES / NAME, dtype=torch.float16).eval()
    assert hf16.language_model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    with torch.no_grad():
        expected16 = hf16.language_model(inputs_embeds=torch.from_numpy(embeds).half(),
                                         attention_mask=torch.from_numpy(mask), decoder_input_ids=torch.from_numpy(dec))
    model16 = load(dtype=mx.float16, keep_fp32=FP32_SUFFIXES)
    logits16 = model16(inputs_embeds=mx.array(embeds).astype(mx.float16), attention_mask=mx.array(mask),
                       decoder_input_ids=mx.array(dec))
    assert str(logits16.dtype).split(".")[-1] == str(expected16.logits.dtype).split(".")[-1]
    assert rel_error(logits16, expected16.logits.float().numpy()) <= 5e-3

    # The overflow guard against transformers with every weight in float16 (wo included).
    lm16 = hf.language_model.half()
    with torch.no_grad():
        lm16.encoder.block[0].layer[1].DenseReluDense.wo.weight.mul_(20000.0)
        expected = lm16.encoder(inputs_embeds=torch.from_numpy(embeds).half(), attention_mask=torch.from_numpy(mask))
    expected = expected.last_hidden_state.float().numpy()
    assert np.isfinite(expected).all()
    encoded = overflowing_model().encode(mx.array(embeds).astype(mx.float16), mx.array(mask))
    assert rel_error(encoded.astype(mx.float32), expected) <= 1e-2
