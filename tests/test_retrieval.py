"""Retrieval (ITM, ITC, projection models, pipeline) against transformers' saved outputs on tiny random checkpoints.

The default run needs no torch. ``-m parity`` re-derives the outputs from the installed transformers.
"""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES, REFERENCE, rel_error
from reference_cases import make_images

from mlx_blip2.models.loading import CheckpointError
from mlx_blip2.pipelines import Blip2Pipeline, load
from mlx_blip2.processing import Blip2Processor
from mlx_blip2.models.retrieval import (
    Blip2ForImageTextRetrieval,
    Blip2TextModelWithProjection,
    Blip2VisionModelWithProjection,
)
from mlx_blip2.pipelines.retrieval import Blip2RetrievalPipeline, load_retrieval

ITM_CHECKPOINTS = ["tiny-blip2-itm", "tiny-blip2-itm-legacy"]


@pytest.fixture(scope="module", params=ITM_CHECKPOINTS)
def loaded(request):
    name = request.param
    model = Blip2ForImageTextRetrieval.from_pretrained(FIXTURES / name, dtype=mx.float32)
    return name, model, dict(np.load(REFERENCE / f"{name}.npz"))


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# --- models against transformers ----------------------------------------------------------------------------------


def test_itm_matches_transformers(loaded):
    _, model, ref = loaded
    out = model(ref["pixel_values"], ref["itm_input_ids"], ref["itm_attention_mask"],
                use_image_text_matching_head=True)
    assert out.logits_per_image.shape == (3, 2) and out.logits_per_text.shape == (2, 3)
    assert rel_error(out.logits_per_image, ref["itm_logits_per_image"]) < 1e-4
    assert rel_error(out.logits_per_text, ref["itm_logits_per_text"]) < 1e-4
    assert rel_error(out.text_embeds, ref["itm_text_embeds"]) < 1e-4


def test_itc_matches_transformers(loaded):
    _, model, ref = loaded
    out = model(ref["pixel_values"], ref["itc_input_ids"], ref["itc_attention_mask"],
                use_image_text_matching_head=False)
    assert out.logits_per_image.shape == (3, 4) and out.logits_per_text.shape == (4, 3)
    for key in ("logits_per_image", "logits_per_text", "image_embeds", "text_embeds"):
        assert rel_error(getattr(out, key), ref[f"itc_{key}"]) < 1e-4, key
    # ITC is the best cosine similarity over the queries, without temperature.
    expected = (np.array(out.image_embeds) @ np.array(out.text_embeds).T).max(axis=1)
    np.testing.assert_allclose(np.array(out.logits_per_image), expected, rtol=1e-5, atol=1e-6)


def test_projection_models_match_transformers(loaded):
    name, _, ref = loaded
    text = Blip2TextModelWithProjection.from_pretrained(FIXTURES / name)
    out = text(ref["text_input_ids"], ref["text_attention_mask"])
    assert rel_error(out.text_embeds, ref["text_text_embeds"]) < 1e-4
    assert rel_error(out.last_hidden_state, ref["text_last_hidden_state"]) < 1e-4
    vision = Blip2VisionModelWithProjection.from_pretrained(FIXTURES / name)
    out = vision(ref["pixel_values"])
    assert rel_error(out.image_embeds, ref["vision_image_embeds"]) < 1e-4
    assert rel_error(out.last_hidden_state, ref["vision_last_hidden_state"]) < 1e-4
    # The halves read only their own weights.
    assert "vision_model" not in text and "itm_head" not in vision and "embeddings" not in vision


def test_text_and_image_embeddings_agree_with_itc(loaded):
    _, model, ref = loaded
    text_only = ref["text_input_ids"], ref["text_attention_mask"]
    assert rel_error(model.get_text_embeds(*text_only), ref["itc_text_embeds"]) < 1e-4
    assert rel_error(model.get_image_embeds(ref["pixel_values"]), ref["itc_image_embeds"]) < 1e-4
    # The [CLS] token of Blip2TextModelWithProjection's output is the ITC text embedding.
    assert rel_error(ref["text_text_embeds"][:, 0], ref["itc_text_embeds"]) < 1e-5


def test_itm_logits_helper_broadcasts_one_image(loaded):
    _, model, ref = loaded
    feats = model.get_image_features(ref["pixel_values"][:1]).last_hidden_state
    logits = model.itm_logits(feats, ref["text_input_ids"][:1], ref["text_attention_mask"][:1])
    assert rel_error(logits, ref["itm_logits_per_image"][:1]) < 1e-4
    many = model.itm_logits(feats, ref["text_input_ids"], ref["text_attention_mask"])
    assert many.shape == (4, 2)
    np.testing.assert_allclose(np.array(many[:1]), np.array(logits), rtol=1e-5, atol=1e-6)


# --- the processor and tokenizer -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ITM_CHECKPOINTS)
def test_processor_matches_transformers(name):
    ref = np.load(REFERENCE / f"{name}.npz")
    processor = Blip2Processor.from_pretrained(FIXTURES / name)
    texts = [str(t) for t in ref["texts"]]
    tok = processor.tokenizer
    assert tok.bos_token == "[DEC]" and tok.cls_token == "[CLS]" and tok.padding_side == "right"
    # [DEC] was added after the WordPiece vocabulary, as on the Hub (id 30522 there).
    assert tok.convert_tokens_to_ids("[DEC]") == len(tok.get_vocab()) - 2  # "<image>" comes after it
    for case, images, n in [("itm", make_images(), 3), ("itc", make_images(), 4), ("text", None, 4)]:
        enc = processor(images=images, text=texts[:n], padding=True)
        np.testing.assert_array_equal(enc["input_ids"], ref[f"{case}_input_ids"])
        np.testing.assert_array_equal(enc["attention_mask"], ref[f"{case}_attention_mask"])
        if images is not None:
            assert np.abs(enc["pixel_values"] - ref["pixel_values"]).max() <= 1e-5
    # Texts start with [CLS], the token whose output is the text embedding.
    assert (ref["text_input_ids"][:, 0] == tok.cls_token_id).all()


# --- the pipeline --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=ITM_CHECKPOINTS)
def pipe(request):
    name = request.param
    return name, load(FIXTURES / name), dict(np.load(REFERENCE / f"{name}.npz"))


def test_load_returns_the_retrieval_pipeline(pipe):
    _, p, _ = pipe
    assert isinstance(p, Blip2RetrievalPipeline) and isinstance(p.model, Blip2ForImageTextRetrieval)
    assert isinstance(load(FIXTURES / "tiny-blip2-opt"), Blip2Pipeline)


def test_pipeline_embeddings_and_similarity(pipe):
    _, p, ref = pipe
    images, texts = make_images(), [str(t) for t in ref["texts"]]
    assert rel_error(p.embed_images(images), ref["itc_image_embeds"]) < 1e-4
    assert p.embed_images(images[0]).shape == ref["itc_image_embeds"].shape[1:]
    assert rel_error(p.embed_texts(texts), ref["itc_text_embeds"]) < 1e-4
    assert rel_error(p.embed_texts(texts[1]), ref["itc_text_embeds"][1]) < 1e-4
    sim = p.similarity(images, texts)
    assert sim.shape == (3, 4) and rel_error(sim, ref["itc_logits_per_image"]) < 1e-4
    assert p.similarity(images[0], texts[0]).shape == (1, 1)


def test_pipeline_match_is_the_itm_probability(pipe):
    _, p, ref = pipe
    images, texts = make_images(), [str(t) for t in ref["texts"]]
    expected = softmax(ref["itm_logits_per_image"].astype(np.float64))[:, 1]
    for i in range(3):
        probs = p.match(images[i], texts[:3])
        assert probs.shape == (3,) and abs(probs[i] - expected[i]) < 1e-5
        assert abs(p.match(images[i], texts[i]) - expected[i]) < 1e-5


def test_rank_itc_then_itm_rerank(pipe):
    _, p, ref = pipe
    images, texts = make_images(), [str(t) for t in ref["texts"]]
    itc = ref["itc_logits_per_image"][:, 0]
    plain = p.rank(texts[0], images, top_k=2, rerank=False)
    assert [r.index for r in plain] == list(np.argsort(-itc)[:2])
    assert all(abs(r.score - itc[r.index]) < 1e-5 and r.itm is None for r in plain)
    full = p.rank(texts[0], images, top_k=3, rerank=True)
    assert sorted(r.index for r in full) == [0, 1, 2]
    assert [r.score for r in full] == sorted((r.score for r in full), reverse=True)
    for r in full:
        logits = p.model.itm_logits(p.image_features([images[r.index]]), *p._text_ids([texts[0]]))
        assert abs(r.itm_logit - float(logits[0, 1])) < 1e-4
        assert abs(r.score - (r.itm_logit + r.itc)) < 1e-6 and abs(r.itc - itc[r.index]) < 1e-5
        assert abs(r.itm - softmax(np.array(logits))[0, 1]) < 1e-5
    # Only the ITC top candidates are re-scored.
    top = p.rank(texts[0], images, top_k=1, rerank=True)
    assert len(top) == 1 and top[0].index == plain[0].index
    assert len(p.rank(texts[0], images, top_k=1, candidates=3)) == 1
    assert p.rank(texts[0], [], top_k=3) == []


def test_partial_pipelines():
    vision = load_retrieval(FIXTURES / "tiny-blip2-itm", part="vision")
    text = load_retrieval(FIXTURES / "tiny-blip2-itm", part="text")
    ref = np.load(REFERENCE / "tiny-blip2-itm.npz")
    assert rel_error(vision.embed_images(make_images()), ref["itc_image_embeds"]) < 1e-4
    assert rel_error(text.embed_texts([str(t) for t in ref["texts"]]), ref["itc_text_embeds"]) < 1e-4
    with pytest.raises(TypeError, match="full retrieval model"):
        text.embed_images(make_images())
    with pytest.raises(TypeError, match="full retrieval model"):
        vision.match(make_images()[0], "a cat")


def test_half_precision_keeps_qformer_in_float32():
    ref = np.load(REFERENCE / "tiny-blip2-itm.npz")
    model = Blip2ForImageTextRetrieval.from_pretrained(FIXTURES / "tiny-blip2-itm", dtype=mx.bfloat16)
    assert model.qformer.layernorm.weight.dtype == mx.float32 and model.query_tokens.dtype == mx.float32
    assert model.itm_head.weight.dtype == mx.bfloat16 and model.embeddings.word_embeddings.weight.dtype == mx.bfloat16
    out = model(ref["pixel_values"], ref["itc_input_ids"], ref["itc_attention_mask"])
    a, b = np.array(out.image_embeds.astype(mx.float32)).ravel(), ref["itc_image_embeds"].ravel()
    assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.99
    itm = model(ref["pixel_values"], ref["itm_input_ids"], ref["itm_attention_mask"],
                use_image_text_matching_head=True).logits_per_image.astype(mx.float32)
    assert np.abs(np.array(itm) - ref["itm_logits_per_image"]).max() < 0.1


# --- bad input and checkpoints -------------------------------------------------------------------------------------


def test_bad_inputs_are_explained(loaded):
    name, model, ref = loaded
    with pytest.raises(ValueError, match="pairs image i with text i"):
        model(ref["pixel_values"], ref["itc_input_ids"], ref["itc_attention_mask"], use_image_text_matching_head=True)
    if not name.endswith("legacy"):
        with pytest.raises(ValueError, match="<image> tokens"):
            model(ref["pixel_values"], ref["text_input_ids"], ref["text_attention_mask"])
    with pytest.raises(ValueError, match="longer than"):
        model.get_text_embeds(np.ones((1, 100), np.int32))


def test_wrong_checkpoint_names_the_missing_weights():
    with pytest.raises(CheckpointError, match="itm_head"):
        Blip2ForImageTextRetrieval.from_pretrained(FIXTURES / "tiny-blip2-opt")


def test_config_without_text_config_loads(tmp_path):
    """Retrieval checkpoints have no language model; a config without text_config must still load."""
    src = FIXTURES / "tiny-blip2-itm"
    shutil.copytree(src, tmp_path / "ckpt")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["text_config"]
    cfg["qformer_config"].pop("use_qformer_text_input")  # text blocks are built whatever the config says
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    ref = np.load(REFERENCE / "tiny-blip2-itm.npz")
    model = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "ckpt")
    out = model(ref["pixel_values"], ref["itm_input_ids"], ref["itm_attention_mask"],
                use_image_text_matching_head=True)
    assert rel_error(out.logits_per_image, ref["itm_logits_per_image"]) < 1e-4


# --- live transformers (-m parity) ---------------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("name", ITM_CHECKPOINTS)
def test_live_parity(name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    directory = FIXTURES / name
    processor = transformers.Blip2Processor.from_pretrained(directory)
    hf = transformers.Blip2ForImageTextRetrieval.from_pretrained(directory, dtype=torch.float32).eval()
    ours = Blip2ForImageTextRetrieval.from_pretrained(directory, dtype=mx.float32)
    images = make_images()
    texts = ["a dog", "two dogs playing in the snow on a sunny day", "a red car", "people on a beach", "fruit"]
    with torch.no_grad():
        enc = processor(images=images, text=texts[:3], return_tensors="pt", padding=True)
        expected = hf(**enc, use_image_text_matching_head=True)
        got = ours(enc["pixel_values"].numpy(), enc["input_ids"].numpy(), enc["attention_mask"].numpy(),
                   use_image_text_matching_head=True)
        assert rel_error(got.logits_per_image, expected.logits_per_image.numpy()) < 1e-4
        enc = processor(images=images[:2], text=texts, return_tensors="pt", padding=True)
        expected = hf(**enc, use_image_text_matching_head=False)
        got = ours(enc["pixel_values"].numpy(), enc["input_ids"].numpy(), enc["attention_mask"].numpy())
        for key in ("logits_per_image", "logits_per_text", "image_embeds", "text_embeds"):
            assert rel_error(getattr(got, key), getattr(expected, key).numpy()) < 1e-4, key

        hf_text = transformers.Blip2TextModelWithProjection.from_pretrained(directory, dtype=torch.float32).eval()
        enc = processor(text=texts, return_tensors="pt", padding=True)
        expected = hf_text(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).text_embeds
        got = Blip2TextModelWithProjection.from_pretrained(directory)(enc["input_ids"].numpy(),
                                                                      enc["attention_mask"].numpy()).text_embeds
        assert rel_error(got, expected.numpy()) < 1e-4

        hf_vision = transformers.Blip2VisionModelWithProjection.from_pretrained(directory, dtype=torch.float32)
        enc = processor(images=images, return_tensors="pt")
        expected = hf_vision.eval()(pixel_values=enc["pixel_values"]).image_embeds
        got = Blip2VisionModelWithProjection.from_pretrained(directory)(enc["pixel_values"].numpy()).image_embeds
        assert rel_error(got, expected.numpy()) < 1e-4
