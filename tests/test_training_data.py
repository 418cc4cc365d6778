"""Training data: the readers (sidecar folders, JSONL, CSV, COCO), the validation split and the collator's labels."""

import json

import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image

from mlx_blip2 import load
from mlx_blip2.library.xmp import update_xmp
from mlx_blip2.training.collator import Collator
from mlx_blip2.training.datasets import DatasetError, Example, read_examples, split_validation


def image(path, color=(200, 30, 30)):
    Image.fromarray(np.full((24, 24, 3), color, np.uint8)).save(path)
    return str(path)


def test_folder_reads_txt_and_both_xmp_namings(tmp_path):
    image(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("a red square\n")
    image(tmp_path / "b.jpg")
    (tmp_path / "b.jpg.xmp").write_bytes(update_xmp(None, "the corrected caption"))
    (tmp_path / "sub").mkdir()
    image(tmp_path / "sub" / "c.png")
    (tmp_path / "sub" / "c.xmp").write_bytes(update_xmp(None, "lightroom naming"))
    image(tmp_path / "uncaptioned.jpg")
    image(tmp_path / "broken.jpg")
    (tmp_path / "broken.jpg.xmp").write_bytes(b"<not xmp")
    errors = []
    got = {e.image.rsplit("/", 1)[-1]: e.target for e in read_examples(str(tmp_path), errors=errors)}
    assert got == {"a.jpg": "a red square", "b.jpg": "the corrected caption", "c.png": "lightroom naming"}
    assert any("broken.jpg" in e and "sidecar" in e for e in errors)
    assert any("1 image(s) without a .txt or XMP caption" in e for e in errors)


def test_jsonl_rows_captions_questions_and_bad_lines(tmp_path):
    lines = [{"image": "x.jpg", "caption": "a cat"}, {"file_name": "y.jpg", "question": "how many?", "answer": "2"},
             {"path": "z.jpg", "question": "color?", "answers": [{"answer": "red"}, "blue", {"answer": "red"}]},
             {"image": "w.jpg"}]
    text = "\n".join(json.dumps(row) for row in lines[:2]) + "\n{broken\n" + "\n".join(map(json.dumps, lines[2:]))
    (tmp_path / "data.jsonl").write_text(text + "\n")
    errors = []
    got = read_examples(str(tmp_path / "data.jsonl"), errors=errors)
    assert [(e.image, e.target, e.question) for e in got] == [
        (str(tmp_path / "x.jpg"), "a cat", None), (str(tmp_path / "y.jpg"), "2", "how many?"),
        (str(tmp_path / "z.jpg"), "red", "color?")]
    assert errors[0].startswith(f"{tmp_path / 'data.jsonl'}:3: not valid JSON")
    assert errors[1].startswith(f"{tmp_path / 'data.jsonl'}:5: no caption")


def test_csv_and_image_root(tmp_path):
    (tmp_path / "data.csv").write_text("image,caption\nx.jpg,a dog on grass\n,missing image\n")
    errors = []
    got = read_examples(str(tmp_path / "data.csv"), image_root="/photos", errors=errors)
    assert [(e.image, e.target) for e in got] == [("/photos/x.jpg", "a dog on grass")]
    assert errors == [f"{tmp_path / 'data.csv'}:3: no image path (one of image, path, file_name, file)"]


def test_coco_annotations(tmp_path):
    coco = {"images": [{"id": 1, "file_name": "one.jpg"}, {"id": 2, "file_name": "two.jpg"}],
            "annotations": [{"image_id": 1, "caption": " A man riding a horse. "}, {"image_id": 2, "caption": "x"},
                            {"image_id": 9, "caption": "orphan"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    errors = []
    got = read_examples(str(tmp_path / "captions.json"), image_root=str(tmp_path / "val2017"), errors=errors)
    assert [(e.image, e.target) for e in got] == [(str(tmp_path / "val2017/one.jpg"), "A man riding a horse."),
                                                  (str(tmp_path / "val2017/two.jpg"), "x")]
    assert errors == [f"{tmp_path / 'captions.json'}: annotations[2]: image_id 9 is not in 'images'"]


def test_unknown_sources_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        read_examples(str(tmp_path / "nope.jsonl"))
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DatasetError, match="expected a folder"):
        read_examples(str(tmp_path / "data.txt"))


def test_validation_split_is_seeded_and_by_image():
    examples = [Example(f"/i{i % 10}.jpg", f"caption {i}") for i in range(30)]
    train, val = split_validation(examples, 0.2, seed=3)
    assert (train, val) == split_validation(examples, 0.2, seed=3)
    assert len({e.image for e in val}) == 2 and not {e.image for e in val} & {e.image for e in train}
    assert len(train) + len(val) == 30


@pytest.fixture(scope="module")
def pipelines():
    return {name: load(FIXTURES / name) for name in ("tiny-blip2-opt", "tiny-blip2-opt-legacy", "tiny-blip2-flan-t5",
                                                     "tiny-instructblip-vicuna")}


@pytest.mark.parametrize("name", ["tiny-blip2-opt", "tiny-blip2-opt-legacy", "tiny-instructblip-vicuna"])
def test_decoder_only_rows_mask_image_tokens_prompt_and_padding(pipelines, name, tmp_path):
    pipe = pipelines[name]
    path = image(tmp_path / "a.png")
    collator = Collator(pipe, prompt="a photo of")
    errors = []
    batch = collator([Example(path, "a red hat"), Example(path, "yes", question="is it red?"),
                      Example(str(tmp_path / "missing.png"), "x")], errors)
    assert errors and "missing.png" in errors[0]
    assert batch["pixel_values"].shape[0] == 2
    tok = pipe.processor.tokenizer
    for row, (prompt, target) in enumerate([(pipe.caption_prompt("a photo of"), "a red hat"),
                                            (pipe.vqa_template.format("is it red?"), "yes")]):
        # the prompt is tokenised exactly as inference tokenises it
        inference = pipe.processor.encode_text([prompt], padding=False, return_tensors=None)["input_ids"][0]
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        n = len(inference)
        assert ids[:n].tolist() == list(inference)
        assert (labels[:n] == -100).all()  # image tokens and prompt
        scored = labels[n:][mask[n:] == 1]
        assert (labels[mask == 0] == -100).all()  # padding
        end = [tok.encode("\n", add_special_tokens=False)[0]] if "opt" in name else [tok.eos_token_id]
        assert scored.tolist()[-1:] == end
        assert tok.decode(scored[:-1]).strip() == target
    if "qformer_input_ids" in batch:
        assert batch["qformer_input_ids"].shape[0] == 2
    out = pipe.model(**batch)
    assert np.isfinite(out.loss.item())


def test_train_on_prompt_keeps_prompt_labels_but_not_image_tokens(pipelines, tmp_path):
    pipe = pipelines["tiny-blip2-opt"]
    row = Collator(pipe, prompt="a photo of", train_on_prompt=True).encode(Example("x", "a dog"))
    image_id = pipe.model.config.image_token_index
    assert all(lab == -100 for t, lab in zip(row["input_ids"], row["labels"]) if t == image_id)
    assert [lab for t, lab in zip(row["input_ids"], row["labels"]) if t != image_id] == \
        [t for t in row["input_ids"] if t != image_id]


def test_t5_rows_feed_prompt_to_encoder_and_target_to_labels(pipelines, tmp_path):
    pipe = pipelines["tiny-blip2-flan-t5"]
    path = image(tmp_path / "a.png")
    batch = Collator(pipe, prompt="a photo of")([Example(path, "a red square"), Example(path, "no")])
    tok = pipe.processor.tokenizer
    no = tok("no")["input_ids"]
    assert batch["labels"][1].tolist() == no + [-100] * (batch["labels"].shape[1] - len(no))
    assert tok.decode(batch["labels"][0][batch["labels"][0] != -100], skip_special_tokens=True) == "a red square"
    prompt = pipe.processor.encode_text(["a photo of"], padding=False, return_tensors=None)["input_ids"][0]
    assert batch["input_ids"][0][:len(prompt)].tolist() == list(prompt)


def test_the_pages_corrections_file_gives_the_latest_correction_of_each_image(tmp_path):
    from mlx_blip2.photo_index.corrections import append_correction, corrections_path, correction_record

    a, b = image(tmp_path / "a.jpg"), image(tmp_path / "b.jpg", (0, 90, 0))
    file = corrections_path(tmp_path / "library.sqlite")
    for path, caption, previous in [(a, "rex on the beach", "a dog"), (b, "the green door", None),
                                    (a, "Rex on Brighton beach", "rex on the beach")]:
        append_correction(file, correction_record(path, caption, previous, [], 1))
    with open(file, "ab") as f:
        f.write(b'{"path": "torn')  # a crash mid-append
    got = read_examples(str(file))
    assert sorted((e.image, e.target) for e in got) == [(a, "Rex on Brighton beach"), (b, "the green door")]
