"""The MLX model against transformers' saved outputs on tiny random checkpoints (no torch needed)."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES, OPT_CHECKPOINTS, REFERENCE, rel_error
from reference_cases import GENERATION_CASES

from mlx_blip2 import Blip2Config, Blip2ForConditionalGeneration, Blip2Model
from mlx_blip2.models.base import ConfigError
from mlx_blip2.models.opt import OPTConfig
from mlx_blip2.models.loading import CheckpointError
from mlx_blip2.models.opt import OPTForCausalLM

CASES = ["single", "nopro", "batch", "vqa"]


@pytest.fixture(scope="module", params=OPT_CHECKPOINTS)
def loaded(request):
    name = request.param
    model = Blip2ForConditionalGeneration.from_pretrained(FIXTURES / name, dtype=mx.float32)
    return name, model, dict(np.load(REFERENCE / f"{name}.npz"))


def test_vision_and_qformer_match_transformers(loaded):
    _, model, ref = loaded
    pv = ref["single_pixel_values"]
    assert rel_error(model.get_image_features(pv).last_hidden_state, ref["vision_last_hidden_state"]) < 1e-4
    assert rel_error(model.get_qformer_features(pv).last_hidden_state, ref["qformer_last_hidden_state"]) < 1e-4
    assert rel_error(model.encode_images(pv), ref["image_features"]) < 1e-4


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(loaded, case):
    name, model, ref = loaded
    out = model(ref[f"{case}_pixel_values"], ref[f"{case}_input_ids"], ref[f"{case}_attention_mask"])
    expected = ref[f"{case}_logits"]
    assert out.logits.shape == expected.shape
    assert rel_error(out.logits, expected) < 1e-4
    if name.endswith("legacy"):
        # Legacy checkpoints prepend the query outputs: logits cover queries + prompt.
        assert out.logits.shape[1] == model.config.num_query_tokens + ref[f"{case}_input_ids"].shape[1]


@pytest.mark.parametrize("case", CASES)
def test_greedy_ids_match_transformers(loaded, case):
    _, model, ref = loaded
    ids = model.generate(
        ref[f"{case}_pixel_values"], ref[f"{case}_input_ids"], ref[f"{case}_attention_mask"],
        max_new_tokens=12, eos_token_id=2, pad_token_id=1,
    )
    np.testing.assert_array_equal(np.array(ids), ref[f"{case}_greedy"])


def test_batched_rows_equal_single_rows(loaded):
    """Each row of a left-padded batch generates what that prompt generates alone."""
    _, model, ref = loaded
    batch = np.array(model.generate(ref["batch_pixel_values"], ref["batch_input_ids"], ref["batch_attention_mask"],
                                    max_new_tokens=8, eos_token_id=2))
    for i in range(batch.shape[0]):
        keep = ref["batch_attention_mask"][i].astype(bool)
        alone = model.generate(ref["batch_pixel_values"][i:i + 1], ref["batch_input_ids"][i:i + 1, keep],
                               max_new_tokens=8, eos_token_id=2)
        np.testing.assert_array_equal(np.array(alone)[0], batch[i, : alone.shape[1]])


def test_generate_without_prompt_uses_default_start(loaded):
    """No input_ids: transformers starts from (image tokens +) BOS, which is what the processor makes for ''."""
    _, model, ref = loaded
    without = model.generate(ref["nopro_pixel_values"], max_new_tokens=12, eos_token_id=2, pad_token_id=1)
    np.testing.assert_array_equal(np.array(without), ref["nopro_greedy"])


def test_image_features_can_be_reused(loaded):
    _, model, ref = loaded
    features = model.encode_images(ref["vqa_pixel_values"])
    ids = model.generate(input_ids=ref["vqa_input_ids"], attention_mask=ref["vqa_attention_mask"],
                         image_features=features, max_new_tokens=12, eos_token_id=2, pad_token_id=1)
    np.testing.assert_array_equal(np.array(ids), ref["vqa_greedy"])


def test_min_new_tokens_and_eos_padding(loaded):
    _, model, ref = loaded
    pv, ids, mask = ref["batch_pixel_values"], ref["batch_input_ids"], ref["batch_attention_mask"]
    free = np.array(model.generate(pv, ids, mask, max_new_tokens=6))
    # Make the first generated token of row 0 an end-of-sequence token: that row stops, the rest go on.
    eos = int(free[0, 0])
    out = np.array(model.generate(pv, ids, mask, max_new_tokens=6, eos_token_id=[eos], pad_token_id=1))
    assert out[0, 0] == eos and (out[0, 1:] == 1).all()
    # min_new_tokens forbids that EOS for the first 3 steps.
    out = np.array(model.generate(pv, ids, mask, max_new_tokens=6, min_new_tokens=3, eos_token_id=[eos]))
    assert eos not in out[:, :3]


def test_blip2_model_api(loaded):
    _, _, ref = loaded
    name = loaded[0]
    model = Blip2Model.from_pretrained(FIXTURES / name)
    text = model.get_text_features(ref["single_input_ids"][:, -5:])
    assert text.logits.shape == (1, 5, model.config.text_config.vocab_size)
    out = model(ref["single_pixel_values"], ref["single_input_ids"], ref["single_attention_mask"])
    assert rel_error(out.logits, ref["single_logits"]) < 1e-4
    assert out.vision_outputs.pooler_output.shape == (1, model.config.vision_config.hidden_size)


def test_opt_project_in_out_matches_transformers():
    config = OPTConfig.from_dict(json.loads((REFERENCE / "tiny-opt-project.json").read_text()))
    assert config.word_embed_proj_dim != config.hidden_size
    model = OPTForCausalLM(config)
    model.load_weights(list(model.sanitize(mx.load(str(REFERENCE / "tiny-opt-project.safetensors"))).items()))
    ref = np.load(REFERENCE / "tiny-opt-project.npz")
    logits = model(input_ids=mx.array(ref["input_ids"]), attention_mask=mx.array(ref["attention_mask"]))
    keep = ref["attention_mask"].astype(bool)  # padded positions are not meaningful
    assert rel_error(np.array(logits)[keep], ref["logits"][keep]) < 1e-4


def test_half_precision_runs_and_keeps_qformer_in_float32(loaded):
    name, model32, ref = loaded
    model = Blip2ForConditionalGeneration.from_pretrained(FIXTURES / name, dtype=mx.bfloat16)
    assert model.qformer.layernorm.weight.dtype == mx.float32
    assert model.query_tokens.dtype == mx.float32
    assert model.language_projection.weight.dtype == mx.bfloat16
    logits = model(ref["single_pixel_values"], ref["single_input_ids"]).logits.astype(mx.float32)
    a, b = np.array(logits).ravel(), ref["single_logits"].ravel()
    assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.99


# --- bad input ---------------------------------------------------------------------------------------------------


def test_wrong_pixel_values_shape_is_explained(loaded):
    _, model, ref = loaded
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, 3, height, width\)"):
        model.generate(ref["single_pixel_values"].transpose(0, 2, 3, 1))
    with pytest.raises(ValueError, match="4 dimensions"):
        model.generate(ref["single_pixel_values"][0])
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        model.generate(np.zeros((1, 3, 28, 28), np.float32))


def test_prompt_without_image_tokens_is_explained():
    model = Blip2ForConditionalGeneration.from_pretrained(FIXTURES / "tiny-blip2-opt")
    ref = np.load(REFERENCE / "tiny-blip2-opt.npz")
    with pytest.raises(ValueError, match="<image> tokens"):
        model(ref["single_pixel_values"], ref["single_input_ids"][:, 8:])
    with pytest.raises(ValueError, match="rows but there are"):
        model(ref["batch_pixel_values"], ref["single_input_ids"])


def test_missing_weights_name_the_keys(tmp_path):
    src = FIXTURES / "tiny-blip2-opt"
    shutil.copytree(src, tmp_path / "ckpt")
    weights = mx.load(str(src / "model.safetensors"))
    del weights["qformer.layernorm.weight"]
    weights["extra.weight"] = mx.zeros((2,))
    mx.save_safetensors(str(tmp_path / "ckpt" / "model.safetensors"), weights)
    with pytest.raises(CheckpointError) as e:
        Blip2ForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    assert "extra.weight" in str(e.value) or "qformer.layernorm.weight" in str(e.value)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Blip2ForConditionalGeneration.from_pretrained(tmp_path / "nope")
    (tmp_path / "ckpt").mkdir()
    shutil.copy(FIXTURES / "tiny-blip2-opt" / "config.json", tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        Blip2ForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Blip2ForConditionalGeneration.from_pretrained(tmp_path / "empty")


def test_sharded_checkpoint_loads(tmp_path):
    src = FIXTURES / "tiny-blip2-opt"
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(src / "config.json", out)
    weights = mx.load(str(src / "model.safetensors"))
    keys = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for fname, names in shards.items():
        mx.save_safetensors(str(out / fname), {k: weights[k] for k in names})
        weight_map.update({k: fname for k in names})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = Blip2ForConditionalGeneration.from_pretrained(out)
    ref = np.load(REFERENCE / "tiny-blip2-opt.npz")
    assert rel_error(model(ref["single_pixel_values"], ref["single_input_ids"]).logits, ref["single_logits"]) < 1e-4
    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002"):
        Blip2ForConditionalGeneration.from_pretrained(out)


def test_split_q_v_bias_checkpoints_load(tmp_path):
    """Older checkpoints store the vision attention bias as q_bias and v_bias."""
    src = FIXTURES / "tiny-blip2-opt"
    shutil.copytree(src, tmp_path / "ckpt")
    weights = mx.load(str(src / "model.safetensors"))
    for k in [k for k in weights if k.endswith("self_attn.qkv.bias")]:
        q, _, v = mx.split(weights.pop(k), 3)
        weights[k.replace("qkv.bias", "q_bias")] = q
        weights[k.replace("qkv.bias", "v_bias")] = v
    mx.save_safetensors(str(tmp_path / "ckpt" / "model.safetensors"), weights)
    model = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    bias = model.vision_model.encoder.layers[0].self_attn.qkv.bias
    D = bias.shape[0] // 3
    assert (np.array(bias[D:2 * D]) == 0).all()  # the key part has no bias


def test_config_errors_name_the_file_and_key(tmp_path):
    cfg = json.loads((FIXTURES / "tiny-blip2-opt" / "config.json").read_text())
    assert Blip2Config.from_dict(cfg).text_config.hidden_size == 32
    sparse = {"text_config": {"model_type": "opt", "hidden_size": 64}}  # Hub configs are sparse
    c = Blip2Config.from_dict(sparse)
    assert c.vision_config.hidden_size == 1408 and c.qformer_config.encoder_hidden_size == 1408
    assert c.text_config.word_embed_proj_dim == 64
    del cfg["text_config"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config.json: missing required key 'text_config'"):
        Blip2Config.from_file(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Blip2Config.from_file(path)
    with pytest.raises(ConfigError, match="'gpt9' is not supported"):
        Blip2Config.from_dict({"text_config": {"model_type": "gpt9"}})


@pytest.mark.parametrize("option_name", sorted(GENERATION_CASES))
@pytest.mark.parametrize("case", CASES)
def test_beam_search_and_processors_match_transformers(loaded, case, option_name):
    _, model, ref = loaded
    options = dict(max_new_tokens=12, eos_token_id=2, pad_token_id=1)
    options.update(GENERATION_CASES[option_name])
    ids = model.generate(ref[f"{case}_pixel_values"], ref[f"{case}_input_ids"], ref[f"{case}_attention_mask"],
                         **options)
    np.testing.assert_array_equal(np.array(ids), ref[f"{case}_{option_name}"])


def test_other_resolutions_interpolate_the_position_grid(loaded):
    _, model, ref = loaded
    pv = ref["interp_pixel_values"]
    assert pv.shape[2:] == (84, 70)
    vision = model.get_image_features(pv, interpolate_pos_encoding=True).last_hidden_state
    assert rel_error(vision, ref["interp_vision"]) < 1e-4
    out = model(pv, ref["interp_input_ids"], ref["interp_attention_mask"], interpolate_pos_encoding=True)
    assert rel_error(out.logits, ref["interp_logits"]) < 1e-4


def test_cpu_gelu_is_exact_gelu():
    import mlx.nn as nn

    from mlx_blip2.models.cpu_math import gelu

    x = mx.concatenate([mx.linspace(-12, 12, 100001), mx.random.normal((10000,)) * 3])
    expected = np.array(nn.gelu(x), dtype=np.float64)
    got = np.array(gelu(x), dtype=np.float64)
    assert np.abs(got - expected).max() < 2e-6
    assert gelu(x.astype(mx.bfloat16)).dtype == mx.bfloat16


def test_cpu_softmax_and_attention_match_exact():
    from mlx_blip2.models.cpu_math import scaled_dot_product_attention, softmax

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, 3, 17, 33)) * 8
    scores[..., 5] = -np.inf  # masked keys
    scores[0, 0, 0, :] = -1e30  # a row whose keys are all masked but one, far below the others
    scores[0, 0, 0, 3] = 0.0
    e = np.exp(scores - scores.max(-1, keepdims=True))
    expected = e / e.sum(-1, keepdims=True)
    got = np.array(softmax(mx.array(scores.astype(np.float32))), dtype=np.float64)
    assert np.abs(got - expected).max() < 1e-6
    assert np.all(got[..., 5] == 0)

    q, k, v = (mx.array(rng.normal(size=(2, 4, n, 16)).astype(np.float32)) for n in (7, 9, 9))
    mask = mx.array(np.where(rng.random((2, 1, 7, 9)) < 0.3, np.finfo(np.float32).min, 0).astype(np.float32))
    for m in (None, mask):
        out = scaled_dot_product_attention(q, k, v, scale=0.25, mask=m)
        assert rel_error(out, np.array(mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=m))) < 1e-6


def test_logits_to_keep_gives_the_last_positions(loaded):
    _, model, ref = loaded
    lm = model.language_model
    ids = mx.array(ref["single_input_ids"])
    full = lm(input_ids=ids)
    np.testing.assert_allclose(np.array(lm(input_ids=ids, logits_to_keep=1)), np.array(full[:, -1:]), rtol=1e-5,
                               atol=1e-6)
    assert lm(input_ids=ids, logits_to_keep=2).shape[1] == 2


def test_transposed_attention_matches_fused_attention():
    # The ViT's copy-free CPU attention (from the transposed qkv projection) against MLX's fused kernel.
    from mlx_blip2.models.cpu_math import attention_from_qkv_t

    B, H, hd, L = 3, 4, 8, 17
    x = mx.random.normal((B, L, H * hd), key=mx.random.key(0))
    w = mx.random.normal((3 * H * hd, H * hd), key=mx.random.key(1)) * 0.3
    for bias in (None, mx.random.normal((3 * H * hd,), key=mx.random.key(2))):
        qkv = x @ w.T + (0 if bias is None else bias)
        qkv_t = qkv.swapaxes(1, 2)  # (B, 3D, L)
        q, k, v = (qkv[..., i * H * hd:(i + 1) * H * hd].reshape(B, L, H, hd).transpose(0, 2, 1, 3) for i in range(3))
        expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=hd ** -0.5)  # (B, H, L, hd)
        got = attention_from_qkv_t(qkv_t, H, hd ** -0.5)  # (B, D, L)
        got = got.reshape(B, H, hd, L).swapaxes(-1, -2)
        assert rel_error(got, np.array(expected)) < 1e-6
