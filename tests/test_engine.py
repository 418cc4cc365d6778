"""The one declaration of generation options, and the batched engine every entry point shares."""

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES
from reference_cases import make_images

from mlx_blip2.cli import build_parser
from mlx_blip2.cli.common import CLI_OPTIONS, generation_kwargs
from mlx_blip2.generation.decoding import GenerationCancelled
from mlx_blip2.pipelines.engine import Completion, ContextLengthError, Engine, Row
from mlx_blip2.generation.options import OPTION_FIELDS, PUBLIC_OPTIONS, GenerationOptions
from mlx_blip2.generation.recipes import CAPTION_DEFAULTS, VQA_DEFAULTS, resolve_recipe
from mlx_blip2.pipelines import load


@pytest.fixture(scope="module")
def pipe():
    return load(FIXTURES / "tiny-blip2-opt")


@pytest.fixture(scope="module")
def t5_pipe():
    return load(FIXTURES / "tiny-blip2-flan-t5")


# --- options -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, value", [
    ("max_new_tokens", 0), ("min_new_tokens", -1), ("num_beams", 0), ("temperature", -0.1), ("top_p", 0.0),
    ("top_p", 1.5), ("top_k", -2), ("min_p", 1.2), ("repetition_penalty", 0.0), ("no_repeat_ngram_size", -1),
    ("seed", -5), ("early_stopping", "sometimes"), ("length_penalty", 1000.0),
])
def test_out_of_range_options_name_the_option(name, value):
    with pytest.raises(ValueError, match=name):
        GenerationOptions(**{name: value})


def test_option_combinations_are_checked():
    with pytest.raises(ValueError, match="num_return_sequences"):
        GenerationOptions(num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="beam-sample"):
        GenerationOptions(do_sample=True, num_beams=2)
    with pytest.raises(ValueError, match="min_new_tokens .* max_new_tokens"):
        GenerationOptions(min_new_tokens=5, max_new_tokens=4)
    with pytest.raises(ValueError, match="unknown generation option 'beams'"):
        resolve_recipe(CAPTION_DEFAULTS, {"beams": 3})


def test_a_sampling_option_switches_a_recipe_to_sampling():
    assert resolve_recipe(CAPTION_DEFAULTS, {}).num_beams == 5
    for option, value in [("temperature", 0.7), ("top_p", 0.9), ("top_k", 5), ("min_p", 0.1)]:
        o = resolve_recipe(CAPTION_DEFAULTS, {option: value})
        assert o.do_sample and o.num_beams == 1 and getattr(o, option) == value
    o = resolve_recipe(CAPTION_DEFAULTS, {"temperature": 0.7, "do_sample": False})
    assert not o.do_sample and o.num_beams == 5  # explicit greedy/beam request wins
    o = resolve_recipe(VQA_DEFAULTS, {"num_beams": 3, "max_new_tokens": 4})
    assert (o.num_beams, o.max_new_tokens, o.length_penalty) == (3, 4, 0.0)


def test_streaming_recipes_decode_without_beams():
    o = resolve_recipe(VQA_DEFAULTS, {}, stream=True)
    assert o.num_beams == 1 and o.length_penalty == 1.0
    with pytest.raises(ValueError, match="num_beams=1"):
        resolve_recipe(VQA_DEFAULTS, {"num_beams": 3}, stream=True)


def test_cli_flags_are_generated_from_the_declaration():
    parser = build_parser()
    args = parser.parse_args(["ask", "x.jpg", "q?", "--min-p", "0.05", "--do-sample", "true", "--top-k", "3"])
    assert generation_kwargs(args) == {"min_p": 0.05, "do_sample": True, "top_k": 3}
    for command in (["ask", "x.jpg", "q"], ["caption", "x.jpg"]):
        args = parser.parse_args(command)
        assert all(hasattr(args, name) for name in CLI_OPTIONS)
    assert "min_p" in CLI_OPTIONS and set(CLI_OPTIONS) <= set(PUBLIC_OPTIONS)
    assert {f.name for f in dataclasses.fields(GenerationOptions)} == set(OPTION_FIELDS)


# --- the engine --------------------------------------------------------------------------------------------------


def reference_ids(pipe, image, prompt, options):
    inputs = pipe.processor(images=[image], text=None if prompt is None else [prompt])
    kwargs = options.replace(eos_token_id=pipe.eos_token_ids()).to_dict()
    return pipe.model.generate(inputs["pixel_values"], inputs.get("input_ids"), **kwargs).tolist()[0]


def test_completions_match_generate_row_by_row(pipe):
    images = make_images()
    options = resolve_recipe(CAPTION_DEFAULTS, {"num_beams": 3, "max_new_tokens": 6})
    rows = [Row(image=images[0], prompt="a photo of"), Row(image=images[1], prompt="a"),
            Row(image=images[2], prompt="the picture shows a")]
    out = pipe.engine.generate(rows, options)
    assert [len(c) for c in out] == [1, 1, 1]
    eos = set(pipe.eos_token_ids())
    for row, (completion,) in zip(rows, out):
        assert isinstance(completion, Completion)
        ids = reference_ids(pipe, row.image, row.prompt, options)
        end = next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))
        assert completion.ids == ids[:end]
        assert completion.text == pipe.processor.decode(ids).strip()
        assert completion.finish_reason == ("stop" if any(t in eos for t in ids) else "length")
        assert completion.generation_tokens == len(completion.ids)
        n_text = len(pipe.processor.tokenizer(row.prompt)["input_ids"])
        assert completion.prompt_tokens == pipe.model.config.num_query_tokens + n_text


def test_each_distinct_image_is_encoded_once(pipe, monkeypatch):
    images = make_images()
    calls = []
    real = pipe.model.encode_images

    def counting(pixel_values, *a, **k):
        calls.append(np.asarray(pixel_values).shape[0])
        return real(pixel_values, *a, **k)

    monkeypatch.setattr(pipe.model, "encode_images", counting)
    rows = [Row(image=images[0], prompt=q) for q in ("what?", "who?", "why?")] + [Row(image=images[1], prompt="x")]
    out = pipe.engine.generate(rows, GenerationOptions(max_new_tokens=3))
    assert calls == [2] and len(out) == 4
    # Precomputed features and preprocessed pixels are accepted as rows too, with the same result.
    features = real(pipe.engine.preprocess(images[0])[None])
    again = pipe.engine.generate([Row(image_features=features[0], prompt="what?"),
                                  Row(pixel_values=pipe.engine.preprocess(images[0]), prompt="what?")],
                                 GenerationOptions(max_new_tokens=3))
    assert again[0][0].ids == again[1][0].ids == out[0][0].ids


def test_context_length_is_checked_for_every_caller(pipe):
    limit = pipe.model.config.text_config.max_position_embeddings
    with pytest.raises(ContextLengthError, match="max_new_tokens"):
        pipe.caption(make_images()[0], max_new_tokens=limit)
    with pytest.raises(ContextLengthError):
        pipe.engine.generate([Row(image=make_images()[0], prompt="a")], GenerationOptions(max_new_tokens=limit))
    with pytest.raises(ContextLengthError):
        list(pipe.engine.stream(Row(image=make_images()[0]), GenerationOptions(max_new_tokens=limit)))


def test_encoder_decoder_models_have_no_position_limit(t5_pipe):
    (c,), = t5_pipe.engine.generate([Row(image=make_images()[0], prompt="Question: what? Answer:")],
                                    GenerationOptions(max_new_tokens=4))
    assert c.finish_reason in ("stop", "length") and c.generation_tokens <= 4


def test_should_stop_cancels_between_steps(pipe):
    with pytest.raises(GenerationCancelled):
        pipe.engine.generate([Row(image=make_images()[0])], GenerationOptions(max_new_tokens=5),
                             should_stop=lambda: True)


def test_stream_pieces_join_to_the_batched_text(pipe):
    image, options = make_images()[1], GenerationOptions(max_new_tokens=8)
    pieces = list(pipe.engine.stream(Row(image=image, prompt="a photo of"), options))
    (c,), = pipe.engine.generate([Row(image=image, prompt="a photo of")], options)
    assert "".join(p.text for p in pieces).strip() == c.text
    assert pieces[-1].finish_reason == c.finish_reason and pieces[-1].prompt_tokens == c.prompt_tokens


def test_rows_must_agree_on_having_a_prompt(pipe):
    with pytest.raises(ValueError, match="every row a prompt"):
        pipe.engine.generate([Row(image=make_images()[0]), Row(image=make_images()[1], prompt="a")],
                             GenerationOptions(max_new_tokens=2))


def test_engine_defaults_to_the_model_eos(pipe):
    engine = Engine(pipe.model, pipe.processor)
    assert engine.eos_token_ids == [pipe.model.config.text_config.eos_token_id]
    assert isinstance(engine.encode([engine.preprocess(make_images()[0])]), mx.array)
