"""BLIP-2 with Flan-T5 against transformers' saved outputs (greedy and beam ids, decoder logits)."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES, REFERENCE, rel_error
from reference_cases import make_images

from mlx_blip2 import Blip2ForConditionalGeneration
from mlx_blip2.cli import main
from mlx_blip2.pipelines.engine import stream_generate
from mlx_blip2.pipelines import load

T5 = FIXTURES / "tiny-blip2-flan-t5"


@pytest.fixture(scope="module")
def model():
    return Blip2ForConditionalGeneration.from_pretrained(T5, dtype=mx.float32)


@pytest.fixture(scope="module")
def ref():
    r = dict(np.load(REFERENCE / "tiny-blip2-flan-t5.npz"))
    r["single_pixel_values"], r["batch_pixel_values"] = r["pixel_values"][:1], r["pixel_values"]
    return r


@pytest.mark.parametrize("case", ["single", "batch"])
def test_decoder_logits_match_transformers(model, ref, case):
    out = model(ref[f"{case}_pixel_values"], ref[f"{case}_input_ids"], ref[f"{case}_attention_mask"],
                decoder_input_ids=ref[f"{case}_decoder_input_ids"])
    assert out.logits.shape == ref[f"{case}_logits"].shape
    assert rel_error(out.logits, ref[f"{case}_logits"]) < 1e-4


@pytest.mark.parametrize(("case", "option"), [("single", "greedy"), ("single", "beam3"), ("batch", "greedy"),
                                              ("batch", "beam3"), ("batch", "beam3_return2")])
def test_generated_ids_match_transformers(model, ref, case, option):
    key = f"{case}_{option}"
    options = {"greedy": {}, "beam3": dict(num_beams=3), "beam3_return2": dict(num_beams=3, num_return_sequences=2)}
    ids = model.generate(ref[f"{case}_pixel_values"], ref[f"{case}_input_ids"], ref[f"{case}_attention_mask"],
                         max_new_tokens=10, **options[option])
    # transformers' encoder-decoder output starts with decoder_start_token_id; ours holds only new tokens.
    np.testing.assert_array_equal(np.array(ids), ref[key][:, 1:])


def test_t5_needs_decoder_input_ids(model, ref):
    with pytest.raises(ValueError, match="decoder_input_ids"):
        model(ref["single_pixel_values"], ref["single_input_ids"])


def test_half_precision_defaults_and_float16_stays_finite(ref):
    m16 = Blip2ForConditionalGeneration.from_pretrained(T5, dtype=mx.float16)
    wo = m16.language_model.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert wo.dtype == mx.float32  # kept in float32, as transformers does for T5 in float16
    out = m16(ref["batch_pixel_values"], ref["batch_input_ids"], ref["batch_attention_mask"],
              decoder_input_ids=ref["batch_decoder_input_ids"]).logits.astype(mx.float32)
    assert bool(mx.isfinite(out).all())
    a, b = np.array(out).ravel(), ref["batch_logits"].ravel()
    assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.999


def test_ask_and_stream_with_t5(capsys):
    pipe = load(T5)
    image = make_images()[0]
    answer = pipe.ask(image, "what is in the picture?", num_beams=1, max_new_tokens=8)
    pieces = list(stream_generate(pipe.model, pipe.processor, image, "Question: what is in the picture? Answer:",
                                  max_new_tokens=8, eos_token_id=pipe.eos_token_ids()))
    assert "".join(p.text for p in pieces).strip() == answer
    assert isinstance(pipe.ask(image, "what?"), str)
    assert main(["ask", str(REFERENCE / "image0.png"), "what is in the picture?", "-m", str(T5), "--stream",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == pipe.ask(REFERENCE / "image0.png", "what is in the picture?",
                                                       num_beams=1, max_new_tokens=8)
