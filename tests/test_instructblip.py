"""InstructBLIP (Vicuna/LLaMA and Flan-T5) against transformers, on tiny random checkpoints in the Hub layout.

The default run compares with saved transformers outputs (tests/fixtures/make_instructblip_fixtures.py); the tests
marked ``parity`` recompute them with the installed transformers + torch.
"""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES, REFERENCE, rel_error
from reference_cases import make_images

from mlx_blip2 import InstructBlipForConditionalGeneration, InstructBlipProcessor, load
from mlx_blip2.models.base import ConfigError
from mlx_blip2.models.llama import LlamaConfig, LlamaForCausalLM
from mlx_blip2.pipelines.instructblip import InstructBlipPipeline

CHECKPOINTS = ["tiny-instructblip-vicuna", "tiny-instructblip-vicuna-legacy", "tiny-instructblip-flan-t5"]
CASES = {"single": 1, "batch": 3, "vqa": 2}  # as make_instructblip_fixtures.CASES
INSTRUCTIONS = ["Describe the image.", "What is unusual about this image? Answer in one sentence.", "a photo of"]
PROMPTS = {"single": INSTRUCTIONS[:1], "batch": INSTRUCTIONS,
           "vqa": ["Question: what is in the picture? Short answer:", "Question: how many dogs are there? Short answer:"]}
OPTIONS = {
    "greedy": {},
    "beam3": dict(num_beams=3),
    "beam4_lp": dict(num_beams=4, num_return_sequences=2, length_penalty=0.6, max_new_tokens=8),
    "penalties": dict(repetition_penalty=1.5, no_repeat_ngram_size=2),
}
MODEL_INPUTS = ("pixel_values", "qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask")


def is_t5(name):
    return name.endswith("flan-t5")


def generation_kwargs(name, processor, options):
    kw = {"max_new_tokens": 10, **options}
    if not is_t5(name):
        kw.update(eos_token_id=2, pad_token_id=processor.tokenizer.pad_token_id)
    return kw


@pytest.fixture(scope="module", params=CHECKPOINTS)
def loaded(request):
    name = request.param
    model = InstructBlipForConditionalGeneration.from_pretrained(FIXTURES / name, dtype=mx.float32)
    processor = InstructBlipProcessor.from_pretrained(FIXTURES / name)
    return name, model, processor, dict(np.load(REFERENCE / f"{name}.npz"))


def inputs(ref, case):
    return [ref[f"{case}_{k}"] for k in MODEL_INPUTS]


@pytest.mark.parametrize("case", CASES)
def test_processor_matches_transformers(loaded, case):
    name, _, processor, ref = loaded
    images = make_images()[:CASES[case]]
    if name.endswith("legacy"):  # no num_query_tokens: transformers 5 tokenizes text and images apart there
        enc = {**processor(text=PROMPTS[case], padding=True), **processor(images=images)}
    else:
        enc = processor(images=images, text=PROMPTS[case], padding=True)
    for key in MODEL_INPUTS:
        np.testing.assert_array_equal(enc[key], ref[f"{case}_{key}"], err_msg=key)
    text = processor.encode_text(PROMPTS[case], padding=True, with_image_tokens=not name.endswith("legacy"))
    np.testing.assert_array_equal(text["qformer_input_ids"], ref[f"{case}_qformer_input_ids"])


@pytest.mark.parametrize("case", CASES)
def test_qformer_and_logits_match_transformers(loaded, case):
    name, model, _, ref = loaded
    pv, qids, qmask, ids, mask = inputs(ref, case)
    qformer = model.get_qformer_features(pv, qids, qmask).last_hidden_state
    assert rel_error(qformer, ref[f"{case}_qformer_last_hidden_state"]) < 1e-4
    assert rel_error(model.encode_images(pv, qformer_input_ids=qids, qformer_attention_mask=qmask),
                     ref[f"{case}_image_features"]) < 1e-4
    extra = {"decoder_input_ids": ref[f"{case}_decoder_input_ids"]} if is_t5(name) else {}
    out = model(pv, qids, qmask, ids, mask, **extra)
    assert out.logits.shape == ref[f"{case}_logits"].shape
    assert rel_error(out.logits, ref[f"{case}_logits"]) < 1e-4
    if name.endswith("legacy"):
        assert out.logits.shape[1] == model.config.num_query_tokens + ids.shape[1]  # queries prepended


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("case", CASES)
def test_generated_ids_match_transformers(loaded, case, option):
    name, model, processor, ref = loaded
    got = model.generate(*inputs(ref, case), **generation_kwargs(name, processor, OPTIONS[option]))
    np.testing.assert_array_equal(np.array(got), ref[f"{case}_{option}"])


def test_instruction_changes_the_image_features(loaded):
    _, model, processor, ref = loaded
    pv = ref["batch_pixel_values"][:1]
    a, b = (processor.encode_text([t], padding=True) for t in INSTRUCTIONS[:2])
    fa = model.encode_images(pv, qformer_input_ids=a["qformer_input_ids"])
    fb = model.encode_images(pv, qformer_input_ids=b["qformer_input_ids"])
    assert fa.shape == (1, model.config.num_query_tokens, model.config.text_config.hidden_size)
    assert rel_error(fa, fb) > 1e-3
    assert model.features_depend_on_prompt


def test_pipeline_recipes_and_engine(loaded):
    """load() gives the InstructBLIP pipeline; its greedy describe decodes what model.generate produces."""
    name, _, processor, ref = loaded
    pipe = load(FIXTURES / name)
    assert isinstance(pipe, InstructBlipPipeline) and pipe.kind == "captioning"
    assert pipe.caption_prompt(None) == "A short image caption." and pipe.vqa_template == "Question: {} Short Answer:"
    assert pipe.vqa_defaults["length_penalty"] == -1.0 and pipe.caption_defaults["repetition_penalty"] == 1.5
    image = make_images()[0]
    text = pipe.describe(image, INSTRUCTIONS[0], num_beams=1, max_new_tokens=10, min_new_tokens=0,
                         repetition_penalty=1.0)
    ids = ref["single_greedy"][0].tolist()
    ids = ids[:ids.index(pipe.eos_token_ids()[0]) + 1] if pipe.eos_token_ids()[0] in ids else ids
    assert text == processor.decode(ids).strip()
    # One image, two instructions: each (image, instruction) pair is encoded with its own instruction, in one
    # batch, as model.generate does it from the processor's padded inputs (padding moves the Q-Former's instruction
    # positions when the tokenizer pads on the left, in transformers too, so rows alone may differ).
    questions = ["what is in the picture?", "how many dogs are there?"]
    both = pipe.ask(image, questions, num_beams=1, max_new_tokens=6, repetition_penalty=1.0)
    enc = processor(images=[image] * 2, text=[pipe.vqa_template.format(q) for q in questions], padding=True)
    if name.endswith("legacy"):
        enc = {**processor(text=[pipe.vqa_template.format(q) for q in questions], padding=True),
               "pixel_values": processor(images=[image] * 2)["pixel_values"]}
    ids = pipe.model.generate(*[enc[k] for k in MODEL_INPUTS], num_beams=1, max_new_tokens=6, min_new_tokens=1,
                              length_penalty=-1.0, eos_token_id=pipe.eos_token_ids(),
                              pad_token_id=processor.tokenizer.pad_token_id)
    assert both == [t.strip() for t in processor.batch_decode(np.array(ids))]
    assert isinstance(pipe.caption(image, max_new_tokens=4), str)  # below the recipe's min_new_tokens=10


def test_missing_qformer_tokenizer_is_a_clear_error(tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "tiny-instructblip-vicuna", target)
    shutil.rmtree(target / "qformer_tokenizer")
    with pytest.raises(FileNotFoundError, match="qformer_tokenizer/"):
        load(target)


def test_wrong_checkpoint_type_is_a_clear_error():
    with pytest.raises(ConfigError, match="instructblip"):
        InstructBlipForConditionalGeneration.from_pretrained(FIXTURES / "tiny-blip2-opt")
    with pytest.raises(FileNotFoundError, match="qformer_tokenizer"):
        InstructBlipProcessor.from_pretrained(FIXTURES / "tiny-blip2-opt")


def test_llama_config_reads_transformers_5_rope_parameters():
    config = LlamaConfig.from_dict({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert config.rope_theta == 5e5 and config.rope_scaling is None
    scaled = LlamaConfig.from_dict({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}})
    assert scaled.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ConfigError, match="silu"):
        LlamaConfig.from_dict({"hidden_act": "gelu"})


def test_llama_bridge_left_padding_equals_unpadded():
    """Positions skip padding in the middle of a row (image tokens before left padding), as transformers' generate."""
    mx.random.seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=64))
    ids = mx.array([[5, 6, 7, 1, 9, 10, 11]])
    padded = mx.array([[5, 6, 7, 0, 0, 1, 9, 10, 11]])
    mask = mx.array([[1, 1, 1, 0, 0, 1, 1, 1, 1]])
    alone = lm(input_ids=ids)[:, -1]
    with_pad = lm(input_ids=padded, attention_mask=mask)[:, -1]
    assert rel_error(with_pad, alone) < 1e-5


@pytest.mark.parametrize(("name", "bits"), [("tiny-instructblip-vicuna", 4), ("tiny-instructblip-vicuna", 8),
                                            ("tiny-instructblip-flan-t5", 4), ("tiny-instructblip-flan-t5", 8)])
def test_convert_quantized(tmp_path, name, bits):
    from mlx_blip2.convert.convert import convert

    out = convert(FIXTURES / name, tmp_path / "q", quantize=True, q_bits=bits, q_group_size=32, dtype="float32")
    assert (out / "qformer_tokenizer" / "tokenizer_config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "instructblip" and config["quantization"]["bits"] == bits
    pipe = load(out)
    assert isinstance(pipe, InstructBlipPipeline)
    ref = dict(np.load(REFERENCE / f"{name}.npz"))
    extra = {"decoder_input_ids": ref["batch_decoder_input_ids"]} if is_t5(name) else {}
    logits = np.array(pipe.model(*inputs(ref, "batch"), **extra).logits).ravel()
    want = ref["batch_logits"].ravel()
    cosine = float(logits @ want / np.linalg.norm(logits) / np.linalg.norm(want))
    # Tiny random weights quantize far worse than trained ones (see test_convert.py): 4-bit only has to stay close.
    assert cosine > (0.995 if bits == 8 else 0.6), cosine
    assert isinstance(pipe.ask(make_images()[1], "what is in the picture?", max_new_tokens=4), str)


# --- live parity with the installed transformers (``-m parity``; skipped where torch is not installed) -----------


@pytest.fixture(scope="module", params=CHECKPOINTS)
def live(request):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    name = request.param
    hf = transformers.InstructBlipForConditionalGeneration.from_pretrained(FIXTURES / name, dtype=torch.float32)
    hf_processor = transformers.InstructBlipProcessor.from_pretrained(FIXTURES / name)
    ours = InstructBlipForConditionalGeneration.from_pretrained(FIXTURES / name, dtype=mx.float32)
    return name, torch, hf.eval(), hf_processor, ours, InstructBlipProcessor.from_pretrained(FIXTURES / name)


def live_inputs(name, hf_processor, n):
    images, prompts = make_images()[:n], INSTRUCTIONS[:n]
    if name.endswith("legacy"):
        return {**hf_processor(text=prompts, return_tensors="pt", padding=True),
                **hf_processor.image_processor(images, return_tensors="pt")}
    return dict(hf_processor(images=images, text=prompts, return_tensors="pt", padding=True))


@pytest.mark.parity
@pytest.mark.parametrize("n", [1, 3])
def test_live_processor_logits_and_ids(live, n):
    name, torch, hf, hf_processor, ours, processor = live
    enc = live_inputs(name, hf_processor, n)
    legacy = name.endswith("legacy")
    mine = processor(text=INSTRUCTIONS[:n], padding=True) if legacy else \
        processor(images=make_images()[:n], text=INSTRUCTIONS[:n], padding=True)
    for key in MODEL_INPUTS[1:]:
        np.testing.assert_array_equal(mine[key], enc[key].numpy(), err_msg=key)
    pv, qids, qmask, ids, mask = (enc[k] for k in MODEL_INPUTS)
    extra = {"decoder_input_ids": torch.tensor([[0, 5, 9, 17], [0, 7, 3, 11], [0, 20, 4, 8]][:n])} if is_t5(name) \
        else {}
    with torch.no_grad():
        if legacy:  # transformers 4.45's path: the projected queries prepended to the prompt embeddings
            q = hf.get_image_features(pv, qformer_input_ids=qids, qformer_attention_mask=qmask).pooler_output
            embeds = torch.cat([q, hf.language_model.get_input_embeddings()(ids)], dim=1)
            full_mask = torch.cat([torch.ones(q.shape[:2], dtype=mask.dtype), mask], dim=1)
            expected = hf.language_model(inputs_embeds=embeds, attention_mask=full_mask, **extra).logits
        else:
            expected = hf(pixel_values=pv, qformer_input_ids=qids, qformer_attention_mask=qmask, input_ids=ids,
                          attention_mask=mask, **extra).logits
    arrays = [enc[k].numpy() for k in MODEL_INPUTS]
    got = ours(*arrays, **{k: v.numpy() for k, v in extra.items()}).logits
    assert rel_error(got, expected.numpy()) < 1e-4
    for option in ("greedy", "beam3", "beam4_lp", "penalties"):
        kw = generation_kwargs(name, processor, OPTIONS[option])
        with torch.no_grad():
            if legacy:
                want = hf.language_model.generate(inputs_embeds=embeds, attention_mask=full_mask, do_sample=False, **kw)
            else:
                want = hf.generate(pixel_values=pv, qformer_input_ids=qids, qformer_attention_mask=qmask,
                                   input_ids=ids, attention_mask=mask, do_sample=False, **kw)
                want = want[:, 1:] if is_t5(name) else want[:, ids.shape[1]:]
        np.testing.assert_array_equal(np.array(ours.generate(*arrays, **kw)), want.numpy(), err_msg=option)


def test_a_blip2_class_refuses_an_instructblip_checkpoint():
    from mlx_blip2 import Blip2ForConditionalGeneration
    from mlx_blip2.models.base import ConfigError

    with pytest.raises(ConfigError, match="InstructBLIP checkpoint.*mlx_blip2.load"):
        Blip2ForConditionalGeneration.from_pretrained(FIXTURES / "tiny-instructblip-vicuna")
