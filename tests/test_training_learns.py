"""Evidence that fine-tuning learns: a tiny model learns four captions for four images to an exact greedy match,
then captions them the same way through load(adapter_path=...), `mlx-blip2 caption --adapter` and a checkpoint
fused by `mlx-blip2-convert --adapter`."""

import json

import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image

from mlx_blip2 import load
from mlx_blip2.training.api import finetune
from mlx_blip2.training.options import TrainOptions
from mlx_blip2.training.trainable import LoraOptions

CAPTIONS = {"red": "a red square", "green": "green grass", "blue": "the blue sea", "white": "white snow"}
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "white": (240, 240, 240)}
GREEDY = dict(num_beams=1, max_new_tokens=12)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("learn")
    data = root / "photos"
    data.mkdir()
    for name, color in COLORS.items():
        Image.fromarray(np.full((40, 40, 3), color, np.uint8)).save(data / f"{name}.png")
        (data / f"{name}.txt").write_text(CAPTIONS[name])
    options = TrainOptions(train="qformer,lora", steps=120, batch_size=4, learning_rate=5e-3, warmup_steps=5,
                           weight_decay=0.0, lora=LoraOptions(rank=8, alpha=16, dropout=0.0), progress=False,
                           eval_samples=4, seed=0)
    pipe = load(FIXTURES / "tiny-blip2-opt")
    result = finetune(pipe, str(data), root / "adapter", options, log=lambda _: None)
    return data, root / "adapter", pipe, result


def images(data):
    return [str(data / f"{name}.png") for name in CAPTIONS]


def test_learns_four_captions_exactly(trained):
    data, _, pipe, result = trained
    assert pipe.caption(images(data), **GREEDY) == list(CAPTIONS.values())
    assert [generated for _, _, generated in result.samples] == [c for _, c, _ in result.samples]


def test_the_base_model_does_not_know_them(trained):
    data, *_ = trained
    assert load(FIXTURES / "tiny-blip2-opt").caption(images(data), **GREEDY) != list(CAPTIONS.values())


def test_captions_through_load_adapter_path(trained):
    data, adapter, _, _ = trained
    assert load(FIXTURES / "tiny-blip2-opt", adapter_path=adapter).caption(images(data), **GREEDY) == \
        list(CAPTIONS.values())


def test_captions_through_the_command_line_adapter(trained, tmp_path):
    from mlx_blip2.cli import main

    data, adapter, _, _ = trained
    out = tmp_path / "captions.jsonl"
    assert main(["caption", *images(data), "-m", str(FIXTURES / "tiny-blip2-opt"), "--adapter", str(adapter),
                 "--num-beams", "1", "--max-new-tokens", "12", "--output", str(out), "-q"]) == 0
    got = {json.loads(line)["path"].rsplit("/", 1)[-1]: json.loads(line)["caption"]
           for line in out.read_text().splitlines()}
    assert got == {f"{name}.png": caption for name, caption in CAPTIONS.items()}


def convert(*args) -> int:
    from mlx_blip2.convert.convert import main

    return main([str(a) for a in args])


def test_captions_through_a_fused_checkpoint(trained, tmp_path):
    data, adapter, _, _ = trained
    fused = tmp_path / "fused"
    assert convert("--hf-path", FIXTURES / "tiny-blip2-opt", "--mlx-path", fused, "--adapter", adapter,
                   "--dtype", "float32") == 0
    assert not (fused / "adapter_config.json").exists() and "--adapter adapter" in (fused / "README.md").read_text()
    assert load(fused).caption(images(data), **GREEDY) == list(CAPTIONS.values())


def test_fused_and_quantized_checkpoint(trained, tmp_path):
    data, adapter, _, _ = trained
    assert convert("--hf-path", FIXTURES / "tiny-blip2-opt", "--mlx-path", tmp_path / "q8", "--adapter", adapter,
                   "-q", "--q-bits", "8", "--q-group-size", "32", "--dtype", "float32") == 0
    model = load(tmp_path / "q8").model
    assert "scales" in model.language_model.model.decoder.layers[0].self_attn.q_proj
    assert load(tmp_path / "q8").caption(images(data), **GREEDY) == list(CAPTIONS.values())


def test_fusing_an_adapter_from_another_base_is_one_error_line(trained, tmp_path, capsys):
    _, adapter, _, _ = trained
    assert convert("--hf-path", FIXTURES / "tiny-blip2-flan-t5", "--mlx-path", tmp_path / "x", "--adapter",
                   adapter) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "adapter trained on" in err and not (tmp_path / "x").exists()
