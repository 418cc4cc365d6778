"""The training loop: repeatable runs, resuming after kill -9 and Ctrl-C, QLoRA, adapters on the wrong base."""

import json
import os
import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES
from mlx.utils import tree_flatten
from PIL import Image

from mlx_blip2 import load
from mlx_blip2.models.adapters import AdapterError, load_adapter
from mlx_blip2.training.api import finetune
from mlx_blip2.training.options import TrainOptions
from mlx_blip2.training.trainable import LoraOptions

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "white": (240, 240, 240)}
# The command line, run in a subprocess so that it can be killed.
FINETUNE = [sys.executable, "-m", "mlx_blip2", "finetune"]


def captioned_folder(root):
    root.mkdir(exist_ok=True)
    for name, color in COLORS.items():
        Image.fromarray(np.full((32, 32, 3), color, np.uint8)).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(f"a {name} square")
    return root


def weights(directory):
    out = {}
    for name in ("adapters.safetensors", "modules.safetensors"):
        if (directory / name).exists():
            out.update({f"{name}:{k}": np.array(v) for k, v in mx.load(str(directory / name)).items()})
    return out


def run_args(data, output, steps=8):
    return [str(data), "-o", str(output), "-m", str(FIXTURES / "tiny-blip2-opt"), "--train", "qformer,lora",
            "--steps", str(steps), "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "2", "--lora-rank", "4",
            "--lora-dropout", "0.1", "--save-every", "2", "--seed", "5", "-q"]


def wait_for(predicate, process, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_resume_after_kill_ends_at_the_same_weights(tmp_path):
    data = captioned_folder(tmp_path / "data")
    subprocess.run(FINETUNE + run_args(data, tmp_path / "whole"), check=True, capture_output=True)
    killed = subprocess.Popen(FINETUNE + run_args(data, tmp_path / "killed"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    checkpoint = tmp_path / "killed" / "checkpoints" / "step-0000004"
    wait_for(checkpoint.exists, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "checkpoints" / "step-0000008").exists()
    resumed = subprocess.run(FINETUNE + run_args(data, tmp_path / "killed") + ["--resume"], capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    whole, again = weights(tmp_path / "whole"), weights(tmp_path / "killed")
    assert whole.keys() == again.keys() and len(whole) > 10
    for k in whole:
        np.testing.assert_array_equal(again[k], whole[k], err_msg=k)


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path):
    data = captioned_folder(tmp_path / "data")
    out = tmp_path / "run"
    process = subprocess.Popen(FINETUNE + run_args(data, out, steps=30), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3,
             process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    steps = [int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir()]
    assert 3 <= max(steps) < 30
    assert (out / "adapter_config.json").exists() and f"interrupted at step {max(steps)}" in err
    resumed = subprocess.run(FINETUNE + run_args(data, out, steps=30) + ["--resume"],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'checkpoints' / f'step-{max(steps):07d}'}" in resumed.stderr


def test_resume_refuses_other_settings(tmp_path, capsys):
    from mlx_blip2.cli import main

    data = captioned_folder(tmp_path / "data")
    assert main(["finetune", *run_args(data, tmp_path / "run", steps=2)]) == 0
    args = run_args(data, tmp_path / "run", steps=2)
    args[args.index("--seed") + 1] = "6"
    capsys.readouterr()
    assert main(["finetune", *args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "trained with seed=5, this run has seed=6" in err and "Traceback" not in err


def test_qlora_trains_on_a_4_bit_language_model_and_applies_to_the_float_base(tmp_path):
    data = captioned_folder(tmp_path / "data")
    pipe = load(FIXTURES / "tiny-blip2-opt")
    options = TrainOptions(train="lora", steps=12, batch_size=4, learning_rate=3e-3, quantize_bits=4,
                           quantize_group_size=32, lora=LoraOptions(rank=4, alpha=8, dropout=0.0), progress=False,
                           eval_samples=0)
    logs = []
    result = finetune(pipe, str(data), tmp_path / "qlora", options, log=logs.append)
    assert any("quantized to 4 bits" in line for line in logs)
    q_proj = pipe.model.language_model.model.decoder.layers[0].self_attn.q_proj
    assert "scales" in q_proj.linear  # the frozen base stayed quantized under the LoRA layer
    first = json.loads((tmp_path / "qlora" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert result.train_loss < first
    float_model = load(FIXTURES / "tiny-blip2-opt", adapter_path=tmp_path / "qlora").model
    assert "scales" not in float_model.language_model.model.decoder.layers[0].self_attn.q_proj.linear


def test_adapter_for_another_base_is_a_clear_error(tmp_path):
    data = captioned_folder(tmp_path / "data")
    options = TrainOptions(train="qformer,lora", steps=1, batch_size=4, progress=False, eval_samples=0)
    finetune(str(FIXTURES / "tiny-blip2-opt"), str(data), tmp_path / "opt", options, log=lambda _: None)
    t5 = load(FIXTURES / "tiny-blip2-flan-t5").model
    with pytest.raises(AdapterError, match=r"\(text_model_type='opt'\); this model has text_model_type='t5'"):
        load_adapter(t5, tmp_path / "opt")
    config = json.loads((tmp_path / "opt" / "adapter_config.json").read_text())
    config["base_model"]["query_tokens_probe"][0] += 0.5  # as if trained from another checkpoint of this shape
    (tmp_path / "opt" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="query tokens differ"):
        load(FIXTURES / "tiny-blip2-opt", adapter_path=tmp_path / "opt")
    with pytest.raises(AdapterError, match="not an adapter directory"):
        load(FIXTURES / "tiny-blip2-opt", adapter_path=tmp_path / "data")


def mixed_sources(root):
    """The same four images as a JSONL of captions and questions, a CSV and COCO annotations."""
    data = captioned_folder(root / "photos")
    rows = [{"image": f"photos/{n}.png", "caption": f"a {n} square"} for n in COLORS]
    rows += [{"image": f"photos/{n}.png", "question": "what color is it?", "answer": n} for n in COLORS]
    (root / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "rows.csv").write_text("image,caption\n" + "".join(f"photos/{n}.png,a {n} thing\n" for n in COLORS))
    coco = {"images": [{"id": i, "file_name": f"photos/{n}.png"} for i, n in enumerate(COLORS)],
            "annotations": [{"image_id": i, "caption": f"the {n} one"} for i, n in enumerate(COLORS)]}
    (root / "coco.json").write_text(json.dumps(coco))
    return data


@pytest.mark.parametrize("name,train", [
    ("tiny-blip2-opt", "vit"), ("tiny-blip2-opt-legacy", "qformer,lora"), ("tiny-blip2-flan-t5", "qformer,vit,lora"),
    ("tiny-instructblip-vicuna", "qformer,lora"), ("tiny-instructblip-flan-t5", "lora"),
])
def test_every_checkpoint_and_data_source_trains_end_to_end(tmp_path, name, train):
    from mlx_blip2.cli import main

    data = mixed_sources(tmp_path)
    args = ["finetune", str(data), str(tmp_path / "rows.jsonl"), str(tmp_path / "rows.csv"), "-o",
            str(tmp_path / "out"), "-m", str(FIXTURES / name), "--train", train, "--steps", "3", "--batch-size", "3",
            "--lr", "1e-3", "--val", str(tmp_path / "coco.json"), "--image-root", str(tmp_path), "--eval-every", "2",
            "--lora-rank", "4", "-q"]
    assert main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(np.isfinite(r["val_loss"]) for r in records if "val_loss" in r) and any("val_loss" in r for r in records)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["trained"] == train.split(",")
    base = dict(tree_flatten(load(FIXTURES / name).model.parameters()))
    tuned = dict(tree_flatten(load(FIXTURES / name, adapter_path=tmp_path / "out").model.parameters()))
    assert any(k not in base or not np.array_equal(np.array(v), np.array(base[k])) for k, v in tuned.items())
