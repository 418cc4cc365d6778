"""Live comparisons with transformers + torch (``-m parity``; skipped where torch is not installed).

The default run compares against saved transformers outputs; these re-derive them from the installed transformers,
so a transformers upgrade that changes BLIP-2's behaviour shows up here.
"""

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES, OPT_CHECKPOINTS, rel_error
from reference_cases import PROMPTS, make_images

from mlx_blip2 import Blip2ForConditionalGeneration

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module", params=OPT_CHECKPOINTS)
def pair(request):
    name = request.param
    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(FIXTURES / name, dtype=torch.float32).eval()
    processor = transformers.Blip2Processor.from_pretrained(FIXTURES / name)
    ours = Blip2ForConditionalGeneration.from_pretrained(FIXTURES / name, dtype=mx.float32)
    return name.endswith("legacy"), hf, processor, ours


def hf_embeds(hf, pixel_values, input_ids, attention_mask):
    """transformers 4.45's legacy layout: projected queries prepended to the prompt embeddings."""
    q = hf.get_image_features(pixel_values).pooler_output
    embeds = torch.cat([q, hf.language_model.get_input_embeddings()(input_ids)], dim=1)
    mask = torch.cat([torch.ones(q.shape[:2], dtype=attention_mask.dtype), attention_mask], dim=1)
    return embeds, mask


@torch.no_grad()
@pytest.mark.parametrize("n", [1, 3])
def test_live_logits_and_greedy_ids(pair, n):
    legacy, hf, processor, ours = pair
    enc = processor(images=make_images()[:n], text=PROMPTS[:n], return_tensors="pt", padding=True)
    pv, ids, mask = enc["pixel_values"], enc["input_ids"], enc["attention_mask"]
    kw = dict(max_new_tokens=10, do_sample=False, num_beams=1, eos_token_id=2, pad_token_id=1)
    if legacy:
        embeds, full_mask = hf_embeds(hf, pv, ids, mask)
        expected = hf.language_model(inputs_embeds=embeds, attention_mask=full_mask).logits
        expected_ids = hf.language_model.generate(inputs_embeds=embeds, attention_mask=full_mask, **kw)
    else:
        expected = hf(pixel_values=pv, input_ids=ids, attention_mask=mask).logits
        expected_ids = hf.generate(pixel_values=pv, input_ids=ids, attention_mask=mask, **kw)[:, ids.shape[1]:]
    out = ours(pv.numpy(), ids.numpy(), mask.numpy())
    assert rel_error(out.logits, expected.numpy()) < 1e-4
    got = ours.generate(pv.numpy(), ids.numpy(), mask.numpy(), max_new_tokens=10, eos_token_id=2, pad_token_id=1)
    np.testing.assert_array_equal(np.array(got), expected_ids.numpy())


@torch.no_grad()
@pytest.mark.parametrize("option_name", ["beam3", "beam4_lp", "beam3_eos_early", "penalties", "min_tokens"])
def test_live_beam_search_and_processors(pair, option_name):
    from reference_cases import GENERATION_CASES

    legacy, hf, processor, ours = pair
    enc = processor(images=make_images(), text=PROMPTS, return_tensors="pt", padding=True)
    pv, ids, mask = enc["pixel_values"], enc["input_ids"], enc["attention_mask"]
    kw = dict(max_new_tokens=10, do_sample=False, eos_token_id=2, pad_token_id=1)
    kw.update(GENERATION_CASES[option_name])
    if legacy:
        embeds, full_mask = hf_embeds(hf, pv, ids, mask)
        expected = hf.language_model.generate(inputs_embeds=embeds, attention_mask=full_mask, **kw)
    else:
        expected = hf.generate(pixel_values=pv, input_ids=ids, attention_mask=mask, **kw)[:, ids.shape[1]:]
    kw.pop("do_sample")
    got = ours.generate(pv.numpy(), ids.numpy(), mask.numpy(), **kw)
    np.testing.assert_array_equal(np.array(got), expected.numpy())


@torch.no_grad()
def test_live_interpolated_position_encoding(pair):
    legacy, hf, processor, ours = pair
    pv = processor.image_processor(make_images(), size={"height": 98, "width": 126}, return_tensors="pt")
    pv = pv["pixel_values"]
    expected = hf.vision_model(pv, interpolate_pos_encoding=True).last_hidden_state
    got = ours.get_image_features(pv.numpy(), interpolate_pos_encoding=True).last_hidden_state
    assert rel_error(got, expected.numpy()) < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("options", [dict(num_beams=1), dict(num_beams=3), dict(num_beams=3, num_return_sequences=2,
                                                                                 length_penalty=0.5)])
def test_live_flan_t5(options):
    name = FIXTURES / "tiny-blip2-flan-t5"
    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(name, dtype=torch.float32).eval()
    processor = transformers.Blip2Processor.from_pretrained(name)
    ours = Blip2ForConditionalGeneration.from_pretrained(name, dtype=mx.float32)
    enc = processor(images=make_images(), text=PROMPTS, return_tensors="pt", padding=True)
    pv, ids, mask = enc["pixel_values"], enc["input_ids"], enc["attention_mask"]
    decoder_ids = torch.tensor([[0, 5, 9]] * 3)
    expected = hf(pixel_values=pv, input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    got = ours(pv.numpy(), ids.numpy(), mask.numpy(), decoder_input_ids=decoder_ids.numpy()).logits
    assert rel_error(got, expected.numpy()) < 1e-4
    expected_ids = hf.generate(pixel_values=pv, input_ids=ids, attention_mask=mask, max_new_tokens=8,
                               do_sample=False, **options)
    got_ids = ours.generate(pv.numpy(), ids.numpy(), mask.numpy(), max_new_tokens=8, **options)
    np.testing.assert_array_equal(np.array(got_ids), expected_ids.numpy()[:, 1:])
