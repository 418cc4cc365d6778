"""The high-level API and the CLI, end to end on the tiny checkpoints."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import FIXTURES, REFERENCE
from PIL import Image
from reference_cases import PROMPTS, make_images

from mlx_blip2.cli import main
from mlx_blip2.generation.recipes import CAPTION_DEFAULTS, VQA_DEFAULTS
from mlx_blip2.pipelines import load
from mlx_blip2.processing import Blip2Processor

TINY = FIXTURES / "tiny-blip2-opt"


@pytest.fixture(scope="module")
def pipe():
    return load(TINY)


def expected_text(pipe, image, prompt=None, defaults=CAPTION_DEFAULTS, **kw):
    """What model.generate + batch_decode give for one image, the long way."""
    inputs = pipe.processor(images=[image], text=None if prompt is None else [prompt])
    ids = pipe.model.generate(inputs["pixel_values"], inputs.get("input_ids"),
                              eos_token_id=pipe.eos_token_ids(), **{**defaults, **kw})
    return pipe.processor.batch_decode(ids.tolist(), skip_special_tokens=True)[0].strip()


def test_caption_single_and_list(pipe):
    images = make_images()
    one = pipe.caption(images[0])
    assert isinstance(one, str) and one == expected_text(pipe, images[0])
    many = pipe.caption(images)
    assert isinstance(many, list) and len(many) == 3
    assert many == [expected_text(pipe, im) for im in images]
    assert pipe.caption([]) == []


def test_caption_accepts_paths_arrays_and_prompts(pipe):
    path = REFERENCE / "image0.png"
    image = Image.open(path)
    assert pipe.caption(str(path)) == pipe.caption(path) == pipe.caption(np.asarray(image)) == pipe.caption(image)
    assert pipe.caption(image, prompt=PROMPTS[0]) == expected_text(pipe, image, PROMPTS[0])


def test_ask_uses_the_vqa_template(pipe):
    image = make_images()[1]
    answer = pipe.ask(image, "what is in the picture?")
    assert answer == expected_text(pipe, image, "Question: what is in the picture? Answer:", VQA_DEFAULTS)
    answers = pipe.ask(image, ["what is in the picture?", "how many dogs are there?"])
    assert answers[0] == answer and len(answers) == 2
    assert answers[1] == expected_text(pipe, image, "Question: how many dogs are there? Answer:", VQA_DEFAULTS)
    assert pipe.ask(image, "what?", template="Q: {} A:") == expected_text(pipe, image, "Q: what? A:", VQA_DEFAULTS)


def test_generation_options_override_the_recipe(pipe):
    image = make_images()[0]
    greedy = pipe.caption(image, num_beams=1, max_new_tokens=6)
    assert greedy == expected_text(pipe, image, num_beams=1, max_new_tokens=6)
    sampled = pipe.caption(image, temperature=0.8, seed=3, max_new_tokens=6)
    assert sampled == expected_text(pipe, image, num_beams=1, do_sample=True, temperature=0.8, seed=3,
                                    max_new_tokens=6)


def test_opt_captions_stop_at_newline(pipe):
    newline = pipe.processor.tokenizer.encode("\n", add_special_tokens=False)
    assert len(newline) == 1 and newline[0] in pipe.eos_token_ids()
    assert pipe.processor.tokenizer.eos_token_id in pipe.eos_token_ids()


def test_legacy_checkpoint_pipeline():
    pipe = load(FIXTURES / "tiny-blip2-opt-legacy")
    ref = np.load(REFERENCE / "tiny-blip2-opt-legacy.npz")
    processor = Blip2Processor.from_pretrained(FIXTURES / "tiny-blip2-opt-legacy")
    assert processor.num_query_tokens is None
    text = pipe.caption(make_images()[0], prompt=PROMPTS[0], max_new_tokens=12, eos_token_id=2, num_beams=1,
                        min_new_tokens=0)
    assert text == processor.batch_decode(ref["single_greedy"].tolist(), skip_special_tokens=True)[0].strip()


def test_missing_image_is_named(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        pipe.caption(str(tmp_path / "nope.jpg"))


def test_cli_caption_and_ask(capsys, tmp_path):
    path = REFERENCE / "image0.png"
    pipe = load(TINY)
    assert main(["caption", str(path), "--model", str(TINY)]) == 0
    assert capsys.readouterr().out.strip() == pipe.caption(path)
    assert main(["ask", str(path), "what is in the picture?", "--model", str(TINY), "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() == pipe.ask(path, "what is in the picture?", max_new_tokens=5)
    # One bad file among good ones: reported, the others still captioned, exit status 1.
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert main(["caption", str(path), str(bad), "--model", str(TINY)]) == 1
    captured = capsys.readouterr()
    assert f"{path}: {pipe.caption(path)}" in captured.out
    assert "bad.jpg" in captured.err


def test_cli_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "mlx_blip2", "doctor"], capture_output=True, text=True, check=True)
    assert "BLAS" in out.stdout and "device" in out.stdout
    out = subprocess.run([sys.executable, "-m", "mlx_blip2", "caption"], capture_output=True, text=True)
    assert out.returncode == 2 and "image" in out.stderr


def test_cli_generation_options_and_streaming(capsys):
    path = REFERENCE / "image2.png"
    pipe = load(TINY)
    assert main(["caption", str(path), "-m", str(TINY), "--num-beams", "2", "--max-new-tokens", "7"]) == 0
    assert capsys.readouterr().out.strip() == pipe.caption(path, num_beams=2, max_new_tokens=7)
    assert main(["caption", str(path), "-m", str(TINY), "--temperature", "0.9", "--seed", "5"]) == 0
    assert capsys.readouterr().out.strip() == pipe.caption(path, temperature=0.9, seed=5)
    assert main(["ask", str(path), "what?", "-m", str(TINY), "--stream", "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == pipe.ask(path, "what?", num_beams=1, max_new_tokens=6)
    assert "tokens/s" in captured.err


def test_top_level_api():
    import mlx_blip2

    pipe = mlx_blip2.load(TINY)
    assert isinstance(pipe.caption(make_images()[0], num_beams=1, max_new_tokens=3), str)
    processor = mlx_blip2.Blip2Processor.from_pretrained(TINY)
    assert processor.num_query_tokens == pipe.model.config.num_query_tokens
    for name in mlx_blip2.__all__:
        assert hasattr(mlx_blip2, name)
