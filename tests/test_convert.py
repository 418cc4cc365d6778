"""The converter (``mlx-blip2-convert``) and loading what it writes, on tiny checkpoints.

Quantization parity is checked against the float32 source. The fixtures' weights are drawn with
``initializer_range=0.5`` (on 32-wide layers: every layer multiplies activations by ~2.8), which makes the
transformers parity tests sensitive but also amplifies quantization noise far beyond what trained models show:
there 8-bit still reaches cosine >= 0.999, while 4-bit reaches only 0.92-0.97. The issue's 4-bit bar (cosine >= 0.98)
is therefore checked on a tiny checkpoint of the same architecture with MLX's default initialisation, where the
residual stream dominates as in trained models (4-bit: ~0.99).
"""

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import FIXTURES, OPT_CHECKPOINTS, REFERENCE, rel_error
from mlx.utils import tree_flatten

from mlx_blip2 import Blip2Config, Blip2ForConditionalGeneration
from mlx_blip2.models.loading import CheckpointError
from mlx_blip2.models.quant import quantize_from_config

cm = importlib.import_module("mlx_blip2.convert.convert")  # the module (the package's `convert` is the function)
from mlx_blip2.convert import convert, main  # noqa: E402

CASES = ["single", "nopro", "batch", "vqa"]
QFORMER = ("qformer.", "query_tokens")
ITEMSIZE = {mx.float32: 4, mx.float16: 2, mx.bfloat16: 2}


# --- helpers --------------------------------------------------------------------------------------------------------

def load(path, dtype=mx.float32):
    return Blip2ForConditionalGeneration.from_pretrained(path, dtype=dtype)


def logits(model, ref, case="single") -> np.ndarray:
    out = model(ref[f"{case}_pixel_values"], ref[f"{case}_input_ids"], ref[f"{case}_attention_mask"]).logits
    return np.array(out.astype(mx.float32))


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def stored(path) -> dict[str, mx.array]:
    weights = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    return weights


def index_total_size(path) -> int:
    return json.loads((Path(path) / "model.safetensors.index.json").read_text())["metadata"]["total_size"]


def quantized_layers(model) -> dict[str, nn.Module]:
    return {p: m for p, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def ref():
    return {name: dict(np.load(REFERENCE / f"{name}.npz")) for name in OPT_CHECKPOINTS}


@pytest.fixture(scope="module")
def source_models():
    return {name: load(FIXTURES / name) for name in OPT_CHECKPOINTS}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Conversions of tiny-blip2-opt shared by several tests, made on first use."""
    root = tmp_path_factory.mktemp("converted")
    made = {}
    recipes = {
        "float32": dict(dtype="float32"),
        "float16": dict(),
        "q8": dict(quantize=True, q_bits=8, q_group_size=32),
        "q4": dict(quantize=True, q_bits=4, q_group_size=32),
    }

    def get(name):
        if name not in made:
            made[name] = convert(FIXTURES / "tiny-blip2-opt", root / name, **recipes[name])
        return made[name]

    return get


@pytest.fixture(scope="module")
def mlx_init_checkpoint(tmp_path_factory):
    """tiny-blip2-opt's architecture and tokenizer with MLX's default initialisation (seeded), in MLX layout."""
    path = tmp_path_factory.mktemp("mlx-init") / "tiny-blip2-opt-mlx-init"
    shutil.copytree(FIXTURES / "tiny-blip2-opt", path)
    mx.random.seed(0)
    model = Blip2ForConditionalGeneration(Blip2Config.from_file(path / "config.json"))
    model.query_tokens = mx.random.normal(model.query_tokens.shape)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return path


# --- float conversions ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", OPT_CHECKPOINTS)
def test_float32_conversion_reproduces_logits_exactly(tmp_path, ref, source_models, name):
    out = convert(FIXTURES / name, tmp_path / "f32", dtype="float32")
    model = load(out)
    for case in CASES:
        expected = logits(source_models[name], ref[name], case)
        np.testing.assert_array_equal(logits(model, ref[name], case), expected)
        assert rel_error(expected, ref[name][f"{case}_logits"]) < 1e-4  # and still transformers' logits
    ids = model.generate(ref[name]["single_pixel_values"], ref[name]["single_input_ids"], max_new_tokens=8,
                         eos_token_id=2)
    np.testing.assert_array_equal(np.array(ids), ref[name]["single_greedy"][:, :8])
    # The stored weights are the source's, in the library's layout.
    weights = stored(out)
    for k, v in tree_flatten(source_models[name].parameters()):
        assert k in weights and weights[k].dtype == mx.float32
        np.testing.assert_array_equal(np.array(weights[k]), np.array(v))


def test_float16_default_keeps_qformer_float32_and_matches_source_in_float16(converted, ref):
    out = converted("float16")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float16" and "quantization" not in config
    for k, v in stored(out).items():
        assert v.dtype == (mx.float32 if k.startswith(QFORMER) else mx.float16), k
    r = ref["tiny-blip2-opt"]
    source = load(FIXTURES / "tiny-blip2-opt", dtype=mx.float16)
    model = load(out, dtype=mx.float16)
    for case in CASES:
        np.testing.assert_array_equal(logits(model, r, case), logits(source, r, case))


def test_default_dtype_is_bfloat16_for_t5(tmp_path):
    assert cm.default_dtype({"text_config": {"model_type": "opt"}}) == "float16"
    assert cm.default_dtype({"text_config": {"model_type": "t5"}}) == "bfloat16"
    out = convert(FIXTURES / "tiny-blip2-opt", tmp_path / "bf16", dtype=mx.bfloat16)
    assert {v.dtype for k, v in stored(out).items() if not k.startswith(QFORMER)} == {mx.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_config_tokenizer_processor_and_card_are_written(converted):
    for name in ("float16", "q4"):
        out = converted(name)
        files = {p.name for p in out.iterdir()}
        assert {"config.json", "model.safetensors", "model.safetensors.index.json", "README.md", "tokenizer.json",
                "tokenizer_config.json", "processor_config.json", "generation_config.json"} <= files
        source = json.loads((FIXTURES / "tiny-blip2-opt" / "config.json").read_text())
        config = json.loads((out / "config.json").read_text())
        for key in source:  # the original configuration, with only the stored precision updated
            if key != "dtype":
                assert config[key] == source[key], key
        for f in ("tokenizer.json", "processor_config.json"):
            assert (out / f).read_bytes() == (FIXTURES / "tiny-blip2-opt" / f).read_bytes()
        card = (out / "README.md").read_text()
        assert card.startswith("---\n") and "library_name: mlx" in card
        assert "mlx-blip2-convert --hf-path" in card and "from mlx_blip2 import load" in card
    assert "-q --q-bits 4 --q-group-size 32" in (converted("q4") / "README.md").read_text()


# --- quantized conversions ------------------------------------------------------------------------------------------

def test_quantization_config_is_mlx_lm_format(converted):
    config = json.loads((converted("q4") / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert config["quantization_config"] == config["quantization"]  # as mlx-lm writes it
    assert Blip2Config.from_file(converted("q4") / "config.json").quantization == config["quantization"]


def test_default_quantization_covers_language_model_qformer_and_projection(converted):
    model = load(converted("q4"))
    quantized = quantized_layers(model)
    assert "language_projection" in quantized
    assert "language_model.model.decoder.embed_tokens" in quantized  # the tied output head
    assert "language_model.model.decoder.embed_positions" not in quantized
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and path.startswith(("qformer.", "language_model.")):
            pytest.fail(f"{path} was not quantized")
        if path.startswith("vision_model.") and isinstance(module, nn.Linear):
            assert module.weight.dtype == mx.float32  # float (float16 in the file), not quantized
    assert all(q.bits == 4 and q.group_size == 32 for q in quantized.values())
    weights = stored(converted("q4"))
    assert weights["vision_model.encoder.layers.0.mlp.fc1.weight"].dtype == mx.float16
    assert "vision_model.encoder.layers.0.mlp.fc1.scales" not in weights


def test_quantize_vision(tmp_path):
    out = convert(FIXTURES / "tiny-blip2-opt", tmp_path / "qv", quantize=True, q_group_size=32, quantize_vision=True)
    quantized = quantized_layers(load(out))
    assert "vision_model.encoder.layers.1.self_attn.qkv" in quantized
    assert "vision_model.encoder.layers.0.mlp.fc2" in quantized
    assert stored(out)["vision_model.embeddings.patch_embedding.weight"].dtype == mx.float16  # conv: not quantized


@pytest.mark.parametrize("name", OPT_CHECKPOINTS)
def test_quantized_logits_on_fixtures(tmp_path, ref, source_models, name):
    """8-bit meets the issue's bar on the (noise-amplifying) fixtures; 4-bit stays close (see the module doc)."""
    q8 = load(convert(FIXTURES / name, tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32))
    q4 = load(convert(FIXTURES / name, tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32))
    for case in CASES:
        expected = logits(source_models[name], ref[name], case)
        assert cosine(logits(q8, ref[name], case), expected) >= 0.999
        assert cosine(logits(q4, ref[name], case), expected) >= 0.9


def test_quantized_logits_meet_issue_bars(tmp_path, ref, mlx_init_checkpoint):
    source = load(mlx_init_checkpoint)
    q8 = load(convert(mlx_init_checkpoint, tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32))
    q4 = load(convert(mlx_init_checkpoint, tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32))
    r = ref["tiny-blip2-opt"]
    for case in CASES:
        expected = logits(source, r, case)
        assert cosine(logits(q8, r, case), expected) >= 0.999
        assert cosine(logits(q4, r, case), expected) >= 0.98


def expected_total_size(source: nn.Module, dtype, bits=None, group_size=None) -> int:
    """Bytes the converter should store for ``source`` (the default quantization predicate, computed here)."""
    modules = dict(source.named_modules())
    embed = source.language_model.get_input_embeddings()
    total = 0
    for key, v in tree_flatten(source.parameters()):
        path, name = key.rsplit(".", 1) if "." in key else ("", key)
        module = modules[path]
        float_size = ITEMSIZE[mx.float32 if key.startswith(QFORMER) else dtype]
        quantized = (bits is not None and path.startswith(("qformer.", "language_projection", "language_model."))
                     and (isinstance(module, nn.Linear) or module is embed)
                     and module.weight.shape[-1] % group_size == 0)
        if quantized and name == "weight":
            groups = v.size // group_size
            total += v.size * bits // 8 + 2 * groups * float_size  # packed weights, scales and biases
        else:
            total += v.size * float_size
    return total


def test_files_shrink_as_expected(converted, source_models):
    source = source_models["tiny-blip2-opt"]
    expected = {
        "float32": expected_total_size(source, mx.float32),
        "float16": expected_total_size(source, mx.float16),
        "q8": expected_total_size(source, mx.float16, 8, 32),
        "q4": expected_total_size(source, mx.float16, 4, 32),
    }
    sizes = {}
    for name, size in expected.items():
        out = converted(name)
        assert index_total_size(out) == size, name
        sizes[name] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        assert 0 < sizes[name] - size < 64 * 1024  # the safetensors headers
    assert sizes["float32"] == pytest.approx((FIXTURES / "tiny-blip2-opt" / "model.safetensors").stat().st_size,
                                             rel=0.01)
    assert sizes["q4"] < sizes["q8"] < sizes["float16"] < sizes["float32"]


def test_layers_not_divisible_by_group_size_stay_float(tmp_path, ref, source_models):
    """Group 64 on 32-wide layers: only the 64-wide inputs (fc2 and the Q-Former's output dense) are quantized."""
    out = convert(FIXTURES / "tiny-blip2-opt", tmp_path / "g64", quantize=True, q_bits=4, q_group_size=64)
    model = load(out)
    quantized = quantized_layers(model)
    assert quantized and all(p.endswith(("fc2", "output_query.dense")) for p in quantized)
    assert "language_model.model.decoder.layers.0.fc2" in quantized
    assert "qformer.encoder.layer.0.output_query.dense" in quantized
    weights = stored(out)
    assert weights["language_model.model.decoder.layers.0.fc1.weight"].dtype == mx.float16
    assert "language_model.model.decoder.embed_tokens.scales" not in weights
    r = ref["tiny-blip2-opt"]
    assert cosine(logits(model, r), logits(source_models["tiny-blip2-opt"], r)) >= 0.98


@pytest.mark.parametrize("recipe", ["head_8", "mixed_3_6"])
def test_recipes_write_per_layer_overrides(tmp_path, ref, source_models, recipe):
    out = convert(FIXTURES / "tiny-blip2-opt", tmp_path / recipe, quantize=True, q_bits=4, q_group_size=32,
                  quant_predicate=recipe)
    q = json.loads((out / "config.json").read_text())["quantization"]
    head = "language_model.model.decoder.embed_tokens"
    if recipe == "head_8":
        assert q == {"group_size": 32, "bits": 4, "mode": "affine",
                     head: {"group_size": 32, "bits": 8, "mode": "affine"}}
    else:
        assert q[head]["bits"] == 6 and q["language_projection"]["bits"] == 6
        assert q["language_model.model.decoder.layers.0.fc1"] == {"group_size": 32, "bits": 3, "mode": "affine"}
        # mlx-lm's layer choice: with 2 layers, layer 1 is in the last eighth and gets more bits, layer 0 not.
        assert q["language_model.model.decoder.layers.1.fc2"]["bits"] == 6
        assert q["language_model.model.decoder.layers.1.self_attn.v_proj"]["bits"] == 6
        assert q["language_model.model.decoder.layers.0.fc2"]["bits"] == 3
        assert not any(k.startswith("vision_model.") for k in q)
    model = load(out)  # strict: every override matches the stored shapes
    for path, layer in quantized_layers(model).items():
        assert layer.bits == (q[path]["bits"] if path in q else 4), path
    r = ref["tiny-blip2-opt"]
    assert cosine(logits(model, r), logits(source_models["tiny-blip2-opt"], r)) >= 0.9


def test_other_quantization_modes(tmp_path, ref, source_models):
    out = convert(FIXTURES / "tiny-blip2-opt", tmp_path / "mxfp8", quantize=True, q_mode="mxfp8")
    assert json.loads((out / "config.json").read_text())["quantization"] == {"group_size": 32, "bits": 8,
                                                                               "mode": "mxfp8"}
    model = load(out)
    assert {q.mode for q in quantized_layers(model).values()} == {"mxfp8"}
    r = ref["tiny-blip2-opt"]
    assert cosine(logits(model, r), logits(source_models["tiny-blip2-opt"], r)) >= 0.95


def test_dequantize(tmp_path, converted, ref):
    r = ref["tiny-blip2-opt"]
    quantized = load(converted("q8"))
    out = convert(converted("q8"), tmp_path / "deq32", dequantize=True, dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    weights = stored(out)
    assert not any(k.endswith((".scales", ".biases")) for k in weights)
    model = load(out)
    assert not quantized_layers(model)
    q_layer = quantized_layers(quantized)["language_model.model.decoder.layers.0.fc1"]
    np.testing.assert_array_equal(
        np.array(model.language_model.model.decoder.layers[0].fc1.weight),
        np.array(mx.dequantize(q_layer.weight, q_layer.scales, q_layer.biases, 32, 8)),
    )
    for case in CASES:
        assert rel_error(logits(model, r, case), logits(quantized, r, case)) < 1e-5
    out16 = convert(converted("q8"), tmp_path / "deq16", dequantize=True)  # default float16
    assert {v.dtype for k, v in stored(out16).items() if not k.startswith(QFORMER)} == {mx.float16}
    assert cosine(logits(load(out16), r), logits(quantized, r)) > 0.9999


def test_inconsistent_arguments_are_refused(tmp_path, converted):
    src = FIXTURES / "tiny-blip2-opt"
    with pytest.raises(ValueError, match="not both"):
        convert(src, tmp_path / "a", quantize=True, dequantize=True)
    with pytest.raises(ValueError, match="nothing to dequantize"):
        convert(src, tmp_path / "a", dequantize=True)
    with pytest.raises(ValueError, match="already quantized"):
        convert(converted("q4"), tmp_path / "a", quantize=True)
    with pytest.raises(ValueError, match="only apply with -q"):
        convert(src, tmp_path / "a", quantize_vision=True)
    with pytest.raises(ValueError, match="mxfp4 quantizes 4-bit in groups of 32"):
        convert(src, tmp_path / "a", quantize=True, q_mode="mxfp4", q_group_size=64)
    with pytest.raises(ValueError, match="need --q-mode affine"):
        convert(src, tmp_path / "a", quantize=True, q_mode="mxfp8", quant_predicate="mixed_3_6")
    with pytest.raises(ValueError, match="unknown --quant-predicate"):
        convert(src, tmp_path / "a", quantize=True, quant_predicate="mixed_1_9")
    with pytest.raises(ValueError, match="--q-bits"):
        convert(src, tmp_path / "a", quantize=True, q_bits=7)
    assert not (tmp_path / "a").exists() and not leftovers(tmp_path)


# --- T5 and retrieval checkpoints -----------------------------------------------------------------------------------

def test_t5_conversions(tmp_path):
    src = FIXTURES / "tiny-blip2-flan-t5"
    r = dict(np.load(REFERENCE / "tiny-blip2-flan-t5.npz"))

    def t5_logits(model):
        out = model(r["pixel_values"][:1], r["single_input_ids"], r["single_attention_mask"],
                    decoder_input_ids=r["single_decoder_input_ids"]).logits
        return np.array(out.astype(mx.float32))

    expected = t5_logits(load(src))
    np.testing.assert_array_equal(t5_logits(load(convert(src, tmp_path / "f32", dtype="float32"))), expected)
    out = convert(src, tmp_path / "default")  # bfloat16: T5 overflows in float16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {v.dtype for k, v in stored(out).items() if not k.startswith(QFORMER)} == {mx.bfloat16}
    np.testing.assert_array_equal(t5_logits(load(out, mx.bfloat16)), t5_logits(load(src, mx.bfloat16)))
    q8 = load(convert(src, tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32))
    assert "language_model.shared" in quantized_layers(q8) and "language_model.lm_head" in quantized_layers(q8)
    assert cosine(t5_logits(q8), expected) >= 0.995  # bfloat16 scales and activations' precision
    q4 = load(convert(src, tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32))
    assert cosine(t5_logits(q4), expected) >= 0.9


@pytest.mark.parametrize("name", ["tiny-blip2-itm", "tiny-blip2-itm-legacy"])
def test_retrieval_conversions(tmp_path, name):
    from mlx_blip2.pipelines import load as load_pipeline
    from mlx_blip2.models.retrieval import Blip2ForImageTextRetrieval, Blip2TextModelWithProjection
    from mlx_blip2.pipelines.retrieval import Blip2RetrievalPipeline

    src = FIXTURES / name
    r = dict(np.load(REFERENCE / f"{name}.npz"))

    def scores(path):
        model = Blip2ForImageTextRetrieval.from_pretrained(path, dtype=mx.float32)
        itm = model(r["pixel_values"], r["itm_input_ids"], r["itm_attention_mask"], use_image_text_matching_head=True)
        itc = model(r["pixel_values"], r["itc_input_ids"], r["itc_attention_mask"], use_image_text_matching_head=False)
        return np.array(itm.logits_per_image), np.array(itc.logits_per_image)

    expected = scores(src)
    for got, want in zip(scores(convert(src, tmp_path / "f32", dtype="float32")), expected):
        np.testing.assert_array_equal(got, want)
    out = convert(src, tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32)
    for got, want in zip(scores(out), expected):
        assert cosine(got, want) >= 0.995  # ITM logits and ITC similarities (the legacy ITC: 0.998)
    quantized = quantized_layers(Blip2ForImageTextRetrieval.from_pretrained(out))
    assert quantized and all(p.startswith("qformer.") for p in quantized)  # the heads stay float
    assert "retrieval" in (out / "README.md").read_text()
    Blip2TextModelWithProjection.from_pretrained(out)  # the partial models load from it too
    pipe = load_pipeline(out)
    assert isinstance(pipe, Blip2RetrievalPipeline)
    assert 0 <= pipe.match(REFERENCE / "image0.png", "a photo") <= 1


# --- loading quantized checkpoints (mlx_blip2.quant) ----------------------------------------------------------------

def test_loader_reads_overrides_false_and_inferred_shapes(tmp_path, converted, ref):
    r = ref["tiny-blip2-opt"]
    src = tmp_path / "head8"
    convert(FIXTURES / "tiny-blip2-opt", src, quantize=True, q_group_size=32, quant_predicate="head_8")
    expected = logits(load(src), r)
    # Without the per-layer entry the loader reads the 8 bits off the stored shapes.
    config = json.loads((src / "config.json").read_text())
    head = "language_model.model.decoder.embed_tokens"
    for key in ("quantization", "quantization_config"):
        config[key].pop(head)
    (src / "config.json").write_text(json.dumps(config))
    model = load(src)
    assert quantized_layers(model)[head].bits == 8
    np.testing.assert_array_equal(logits(model, r), expected)
    # `false` keeps a layer in float: it then cannot take quantized weights (strict loading).
    config["quantization"][head] = False
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not match"):
        load(src)
    # An override that disagrees with the stored shapes is an error too.
    config["quantization"][head] = {"group_size": 32, "bits": 4}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not match"):
        load(src)


def test_quantize_from_config_without_quantization_is_a_no_op():
    model = nn.Sequential(nn.Linear(32, 32))
    assert quantize_from_config(model, None, {}) is model
    assert isinstance(model.layers[0], nn.Linear)
    quantize_from_config(model, {"group_size": 32, "bits": 4, "layers.0": {"group_size": 32, "bits": 8}}, {})
    assert isinstance(model.layers[0], nn.QuantizedLinear) and model.layers[0].bits == 8


def test_sharded_conversion_loads(tmp_path, monkeypatch, ref, source_models):
    import mlx_lm.utils

    make_shards = mlx_lm.utils.make_shards

    def small_shards(weights, max_file_size_gb=5):  # ~4 shards of the 0.4 MB model
        shards = make_shards(weights, 0)
        per = -(-len(shards) // 4)
        return [{k: v for s in shards[i:i + per] for k, v in s.items()} for i in range(0, len(shards), per)]

    monkeypatch.setattr(mlx_lm.utils, "make_shards", small_shards)
    out = convert(FIXTURES / "tiny-blip2-opt", tmp_path / "sharded", dtype="float32")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert sorted(set(index["weight_map"].values())) == shards
    r = ref["tiny-blip2-opt"]
    np.testing.assert_array_equal(logits(load(out), r), logits(source_models["tiny-blip2-opt"], r))


def test_hub_repo_id_of_a_converted_model(tmp_path, monkeypatch, converted, ref):
    """A converted model in the Hub cache loads, and converts, by its repo id (offline)."""
    import huggingface_hub.constants as constants

    snapshot = tmp_path / "hub" / "models--someone--blip2-q4" / "snapshots" / ("0" * 40)
    shutil.copytree(converted("q4"), snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    r = ref["tiny-blip2-opt"]
    expected = logits(load(converted("q4")), r)
    np.testing.assert_array_equal(logits(load("someone/blip2-q4"), r), expected)
    out = convert("someone/blip2-q4", tmp_path / "deq", dequantize=True, dtype="float32")
    assert cosine(logits(load(out), r), expected) > 0.99999
    assert "base_model: someone/blip2-q4" in (out / "README.md").read_text()


def test_pipeline_captions_with_a_quantized_conversion(converted):
    from mlx_blip2.pipelines import load as load_pipeline

    pipe = load_pipeline(converted("q4"))
    caption = pipe.caption(REFERENCE / "image0.png", max_new_tokens=5)
    assert isinstance(caption, str)
    assert isinstance(pipe.ask(REFERENCE / "image1.png", "what is it?", max_new_tokens=3), str)


def test_legacy_checkpoint_files_are_copied(tmp_path):
    out = convert(FIXTURES / "tiny-blip2-opt-legacy", tmp_path / "legacy", quantize=True, q_group_size=32)
    assert (out / "preprocessor_config.json").exists() and not (out / "processor_config.json").exists()
    from mlx_blip2.pipelines import load as load_pipeline

    assert isinstance(load_pipeline(out).caption(REFERENCE / "image0.png", max_new_tokens=3), str)


# --- refused and interrupted conversions ----------------------------------------------------------------------------

def test_existing_target_is_refused_unless_force(tmp_path, capsys, ref, source_models):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        convert(FIXTURES / "tiny-blip2-opt", target)
    assert main(["--hf-path", str(FIXTURES / "tiny-blip2-opt"), "--mlx-path", str(target)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert main(["--hf-path", str(FIXTURES / "tiny-blip2-opt"), "--mlx-path", str(target), "--force",
                 "--dtype", "float32"]) == 0
    assert not (target / "keep.txt").exists() and (target / "config.json").exists()
    assert leftovers(tmp_path) == []
    r = ref["tiny-blip2-opt"]
    np.testing.assert_array_equal(logits(load(target), r), logits(source_models["tiny-blip2-opt"], r))


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch, error):
    save_weights = cm.save_weights
    seen = []

    def failing(directory, model):
        save_weights(directory, model)  # a partly written checkpoint: weights but no config yet
        seen.append(sorted(p.name for p in directory.iterdir()))
        raise error

    monkeypatch.setattr(cm, "save_weights", failing)
    target = tmp_path / "out"
    with pytest.raises(type(error)):
        convert(FIXTURES / "tiny-blip2-opt", target, quantize=True, q_group_size=32)
    assert "model.safetensors" in seen[0]  # it did get that far
    assert not target.exists()
    assert leftovers(tmp_path) == []  # the temporary directory is gone
    with pytest.raises(FileNotFoundError):
        load(target)
    # Through the CLI: a message and a non-zero status.
    args = ["--hf-path", str(FIXTURES / "tiny-blip2-opt"), "--mlx-path", str(target)]
    if isinstance(error, KeyboardInterrupt):
        assert main(args) == 130
    else:
        with pytest.raises(RuntimeError):
            main(args)
    assert not target.exists() and leftovers(tmp_path) == []


def test_interrupted_forced_conversion_keeps_the_old_target(tmp_path, monkeypatch, converted):
    target = tmp_path / "out"
    shutil.copytree(converted("q4"), target)
    before = sorted(p.name for p in target.iterdir())

    def failing(directory, model):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed")

    monkeypatch.setattr(cm, "save_weights", failing)
    with pytest.raises(RuntimeError, match="killed"):
        convert(FIXTURES / "tiny-blip2-opt", target, force=True)
    assert sorted(p.name for p in target.iterdir()) == before
    assert leftovers(tmp_path) == []
    load(target)


def test_partial_temporary_directory_does_not_load(tmp_path, monkeypatch):
    """Even a temporary directory left by a killed process holds no config.json until the very end."""
    kept = []

    def failing(directory, model):
        cm.copy_support_files(FIXTURES / "tiny-blip2-opt", directory)
        kept.append(shutil.copytree(directory, tmp_path / "snapshot"))
        raise RuntimeError("killed")

    monkeypatch.setattr(cm, "save_weights", failing)
    with pytest.raises(RuntimeError):
        convert(FIXTURES / "tiny-blip2-opt", tmp_path / "out")
    assert not (kept[0] / "config.json").exists()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(kept[0])


def test_bad_hf_path_is_a_clear_error(tmp_path, capsys):
    target = tmp_path / "out"
    assert main(["--hf-path", str(tmp_path / "missing"), "--mlx-path", str(target)]) == 1
    assert "checkpoint directory not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--hf-path", str(tmp_path / "empty"), "--mlx-path", str(target)]) == 1
    assert "no config.json; is this a BLIP-2 checkpoint?" in capsys.readouterr().err
    (tmp_path / "opt").mkdir()
    (tmp_path / "opt" / "config.json").write_text(json.dumps({"model_type": "opt", "hidden_size": 32}))
    assert main(["--hf-path", str(tmp_path / "opt"), "--mlx-path", str(target)]) == 1
    assert "expected a BLIP-2 checkpoint" in capsys.readouterr().err
    (tmp_path / "file.txt").write_text("x")
    assert main(["--hf-path", str(tmp_path / "file.txt"), "--mlx-path", str(target)]) == 1
    assert "is a file" in capsys.readouterr().err
    assert not target.exists() and leftovers(tmp_path) == []


# --- the command line and the upload --------------------------------------------------------------------------------

def test_cli_main_converts(tmp_path, capsys, ref, source_models):
    target = tmp_path / "q8"
    assert main(["--hf-path", str(FIXTURES / "tiny-blip2-opt"), "--mlx-path", str(target), "-q", "--q-bits", "8",
                 "--q-group-size", "32", "--quant-predicate", "head_8"]) == 0
    assert "[INFO] Quantizing" in capsys.readouterr().out
    config = json.loads((target / "config.json").read_text())
    assert config["quantization"]["bits"] == 8
    assert config["quantization"]["language_model.model.decoder.embed_tokens"]["bits"] == 8
    r = ref["tiny-blip2-opt"]
    assert cosine(logits(load(target), r), logits(source_models["tiny-blip2-opt"], r)) >= 0.999
    with pytest.raises(SystemExit):
        main(["--mlx-path", str(tmp_path / "x")])  # --hf-path is required
    with pytest.raises(SystemExit):
        main(["--hf-path", "x", "--q-bits", "7"])


def test_python_dash_m_help():
    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-m", "mlx_blip2.convert", "--help"], capture_output=True, text=True,
                         cwd="/", env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--hf-path", "--mlx-path", "--q-bits", "--q-group-size", "--q-mode", "--dtype", "--quantize-vision",
                 "--quant-predicate", "--dequantize", "--upload-repo", "--force", "mixed_3_6"):
        assert flag in out.stdout
    script = Path(sys.executable).parent / "mlx-blip2-convert"
    if script.exists():
        out = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd="/", timeout=120)
        assert out.returncode == 0 and "usage: mlx-blip2-convert" in out.stdout


def test_upload_is_wired(tmp_path, monkeypatch):
    import huggingface_hub

    with pytest.raises(ValueError, match="not a valid Hub repo id"):
        convert(FIXTURES / "tiny-blip2-opt", tmp_path / "bad", upload_repo="not a repo//id")
    assert not (tmp_path / "bad").exists()

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, **kwargs):
            calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path))))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = convert(FIXTURES / "tiny-blip2-opt", tmp_path / "up", upload_repo="me/blip2-tiny")
    assert calls[0] == ("create_repo", "me/blip2-tiny")
    assert calls[1][:2] == ("upload_folder", "me/blip2-tiny") and "config.json" in calls[1][2]
    assert 'load("me/blip2-tiny")' in (out / "README.md").read_text()

    class OfflineApi(FakeApi):
        def create_repo(self, repo_id, **kwargs):
            raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    with pytest.raises(cm.UploadError, match="kept|is in") as e:
        convert(FIXTURES / "tiny-blip2-opt", tmp_path / "up2", upload_repo="me/blip2-tiny")
    assert str(tmp_path / "up2") in str(e.value) and (tmp_path / "up2" / "config.json").exists()
