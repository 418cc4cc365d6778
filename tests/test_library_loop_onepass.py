"""One pass (``mlx-blip2 caption DIR --index DB``): captions equal those of ``caption`` alone and embeddings equal
those of ``index`` alone, with one shared ViT pass when the vision weights are equal (a copy of the tiny retrieval
checkpoint given the tiny captioning checkpoint's ViT) and two otherwise; error records, resume after an interrupted
run, caption words searchable at once."""

import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES
from reference_cases import make_images
from safetensors.numpy import load_file, save_file

from mlx_blip2.cli import main
from mlx_blip2.library.job import CaptionJob, caption
from mlx_blip2.photo_index import PhotoIndex, search
from mlx_blip2.photo_index.job import IndexJob, index
from mlx_blip2.photo_index.onepass import OnePassEngine, caption_and_index
from mlx_blip2.pipelines import load

OPT = FIXTURES / "tiny-blip2-opt"
ITM = FIXTURES / "tiny-blip2-itm"
OPTIONS = {"max_new_tokens": 8}


@pytest.fixture(scope="module")
def itm_shared(tmp_path_factory):
    """The tiny retrieval checkpoint with the tiny captioning checkpoint's vision tensors (the fixtures' differ)."""
    out = tmp_path_factory.mktemp("itm-shared") / "tiny-blip2-itm-shared"
    shutil.copytree(ITM, out)
    weights = load_file(str(out / "model.safetensors"))
    opt = load_file(str(OPT / "model.safetensors"))
    vision = {k: v for k, v in opt.items() if k.startswith("vision_model.")}
    assert set(vision) == {k for k in weights if k.startswith("vision_model.")}
    assert any(not np.array_equal(weights[k], v) for k, v in vision.items())
    weights.update(vision)
    save_file(weights, str(out / "model.safetensors"))
    return out


@pytest.fixture(scope="module")
def captioner():
    return load(OPT)


@pytest.fixture
def photos(tmp_path):
    lib = tmp_path / "photos"
    (lib / "sub").mkdir(parents=True)
    for i, img in enumerate(make_images() * 2):
        img.rotate(25 * i).save((lib / "sub" if i % 2 else lib) / f"p{i}.png")
    (lib / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return lib


def records(path) -> dict:
    out = {}
    for line in open(path, encoding="utf-8"):
        r = json.loads(line)
        out[r["path"]] = r.get("caption") or ("error", r.get("error") is not None)
    return out


def embeddings(db_path) -> dict:
    with PhotoIndex(db_path, create=False) as db:
        return {p: db.embedding(p) for p, (_, _, ok) in db.files().items() if ok}, dict(db.errors())


def alone(captioner, lib, tmp_path, itm):
    caption(captioner, CaptionJob([str(lib)], recursive=True, output=str(tmp_path / "alone.jsonl"), batch_size=3,
                                  generate_kwargs=OPTIONS), group=None)
    index(IndexJob([str(lib)], db=str(tmp_path / "alone.sqlite"), model=str(itm), recursive=True, batch_size=3),
          group=None)
    return records(tmp_path / "alone.jsonl"), embeddings(tmp_path / "alone.sqlite")


def one_pass(captioner, lib, out, itm, log, **job):
    cj = CaptionJob([str(lib)], recursive=True, output=str(out / "pass.jsonl"), batch_size=3,
                    generate_kwargs=OPTIONS, **job)
    ij = IndexJob([str(lib)], db=str(out / "pass.sqlite"), model=str(itm), batch_size=3)
    return caption_and_index(lambda: captioner, cj, ij, group=None, log=log)


@pytest.mark.parametrize("shared", [True, False])
def test_one_pass_equals_caption_then_index(captioner, photos, tmp_path, itm_shared, shared, capsys):
    itm = itm_shared if shared else ITM
    expected_captions, (expected_embeds, expected_errors) = alone(captioner, photos, tmp_path, itm)
    calls = []
    original = type(captioner.model.vision_model).__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    type(captioner.model.vision_model).__call__ = counting
    try:
        result = one_pass(captioner, photos, tmp_path, itm, log=sys.stderr)
    finally:
        type(captioner.model.vision_model).__call__ = original
    message = capsys.readouterr().err
    assert result.share.shared is shared
    assert ("one ViT pass serves both models" in message) is shared
    assert ("the ViT runs twice: the two checkpoints' vision weights differ" in message) is (not shared)
    # 6 good images in batches of 3: two ViT calls, or four when each model runs its own (any Blip2VisionModel counts)
    assert len(calls) == (2 if shared else 4)
    assert records(tmp_path / "pass.jsonl") == expected_captions
    embeds, errors = embeddings(tmp_path / "pass.sqlite")
    assert embeds.keys() == expected_embeds.keys() and len(embeds) == 6
    for path, e in embeds.items():
        np.testing.assert_array_equal(e, expected_embeds[path])
    assert errors.keys() == expected_errors.keys() == {str(photos / "broken.jpg")}
    assert result.embedded_in_pass == 6 and result.index.added == 6 and len(result.index.failed) == 1
    # The captions are in the index: a word of one of them finds its photo.
    path, text = next((p, c) for p, c in expected_captions.items() if isinstance(c, str) and c.split())
    word = max(text.split(), key=len)
    with PhotoIndex(tmp_path / "pass.sqlite", create=False) as db:
        found = [r.path for r in search(db, word, k=10, mode="text")]
    assert path in found


def test_an_interrupted_pass_resumes(captioner, photos, tmp_path, itm_shared, monkeypatch):
    expected_captions, (expected_embeds, _) = alone(captioner, photos, tmp_path, itm_shared)
    original = OnePassEngine.generate
    seen = []

    def interrupted(self, rows, options, should_stop=None):
        if seen:
            raise KeyboardInterrupt
        seen.append(1)
        return original(self, rows, options, should_stop)

    monkeypatch.setattr(OnePassEngine, "generate", interrupted)
    first = one_pass(captioner, photos, tmp_path, itm_shared, log=io.StringIO())
    assert first.summary.interrupted and first.embedded_in_pass == 3
    monkeypatch.setattr(OnePassEngine, "generate", original)
    second = one_pass(captioner, photos, tmp_path, itm_shared, log=io.StringIO())
    assert second.summary.skipped == 3 and second.summary.captioned == 3
    assert records(tmp_path / "pass.jsonl") == expected_captions
    embeds, _ = embeddings(tmp_path / "pass.sqlite")
    assert embeds.keys() == expected_embeds.keys()
    for path, e in embeds.items():
        np.testing.assert_array_equal(e, expected_embeds[path])
    # Nothing left: a third pass captions and embeds nothing.
    third = one_pass(captioner, photos, tmp_path, itm_shared, log=io.StringIO())
    assert third.summary.captioned == 0 and third.embedded_in_pass == 0 and third.index.added == 0


def test_the_command_line(photos, tmp_path, itm_shared, capsys):
    db, out = tmp_path / "lib.sqlite", tmp_path / "c.jsonl"
    argv = ["caption", str(photos), "-r", "-m", str(OPT), "--index", str(db), "--index-model", str(itm_shared),
            "-o", str(out), "--max-new-tokens", "8", "--batch-size", "3"]
    assert main(argv) == 1  # the broken image
    err = capsys.readouterr().err
    assert "one ViT pass serves both models" in err and "captioned 6, skipped 0, failed 1" in err
    assert f"{db}: 6 added, 0 updated, 0 unchanged" in err and "6 images searchable" in err
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "captioned 0, skipped 6, failed 1" in err and "0 added, 0 updated, 7 unchanged" in err
    assert main(["caption", str(photos), "--index", str(db), "--index-model", str(OPT), "-o", str(out)]) == 2
    assert "retrieval" in capsys.readouterr().err  # a captioning checkpoint given as the index's model


LAUNCH = Path(sys.executable).parent / "mlx.launch"


@pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed")
def test_one_pass_under_launch(photos, tmp_path, itm_shared, captioner):
    expected_captions, (expected_embeds, expected_errors) = alone(captioner, photos, tmp_path, itm_shared)
    db, out = tmp_path / "launched.sqlite", tmp_path / "launched.jsonl"
    port = str(random.randrange(20000, 60000, 16))
    cmd = [str(LAUNCH), "-n", "2", "--starting-port", port, "--", sys.executable, "-m", "mlx_blip2", "caption",
           str(photos), "-r", "-m", str(OPT), "--index", str(db), "--index-model", str(itm_shared), "-o", str(out),
           "--max-new-tokens", "8", "--batch-size", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=240)
    log = proc.stdout + proc.stderr
    assert "captioned 6, skipped 0, failed 1 of 7 images" in log and "6 images searchable" in log, log
    assert log.count("one ViT pass serves both models") == 1  # rank 0 says it
    assert records(out) == expected_captions
    embeds, errors = embeddings(db)
    assert embeds.keys() == expected_embeds.keys() and errors.keys() == expected_errors.keys()
    for path, e in embeds.items():  # other batches than one process's: equal to float16 rounding
        np.testing.assert_allclose(e, expected_embeds[path], atol=2e-3)
    assert not [n for n in os.listdir(tmp_path) if ".part-" in n]
