"""Caption datasets from their standard files: LAVIS's Karpathy splits (``coco_karpathy_test.json``,
``flickr30k_test.json``: ``[{"image", "caption": [...]}]``), COCO-format annotations (``captions_val2017.json``,
NoCaps' ``nocaps_val_4500_captions.json`` with each image's ``domain``) and Karpathy's ``dataset_*.json``.

Images are scored under the id the official tools use: COCO's image id (for the Karpathy split, the number in the
file name, as LAVIS's ``coco_karpathy_test_gt.json`` has it), Flickr30k's file name without extension.
"""

from __future__ import annotations

import os

from .data import Item, TaskData, image_path, numeric_id, read_json, require


def _lavis_id(relative: str):
    stem = os.path.splitext(os.path.basename(relative))[0]
    return numeric_id(stem.split("_")[-1])


def _from_lavis(entries: list, path, root) -> tuple[dict, dict]:
    captions, images = {}, {}
    for i, entry in enumerate(entries):
        require(entry, ("image", "caption"), path, i)
        image_id = _lavis_id(entry["image"])
        refs = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        captions.setdefault(image_id, []).extend(str(c) for c in refs)
        images[image_id] = image_path(root, entry["image"])
    return captions, images


def _from_coco(data: dict, path, root) -> tuple[dict, dict, dict]:
    images, groups = {}, {}
    for i, image in enumerate(data.get("images", [])):
        require(image, ("id", "file_name"), path, f"images[{i}]")
        images[image["id"]] = image_path(root, image["file_name"])
        if "domain" in image:
            groups[image["id"]] = image["domain"]
    captions = {image_id: [] for image_id in images}
    for i, ann in enumerate(data["annotations"]):
        require(ann, ("image_id", "caption"), path, f"annotations[{i}]")
        if ann["image_id"] not in captions:
            raise ValueError(f"{os.fspath(path)}: annotations[{i}] names image_id {ann['image_id']} not in 'images'")
        captions[ann["image_id"]].append(str(ann["caption"]))
    return captions, images, groups


def _from_karpathy(data: dict, path, root, split: str) -> tuple[dict, dict]:
    captions, images = {}, {}
    for i, image in enumerate(data["images"]):
        require(image, ("filename", "sentences"), path, f"images[{i}]")
        if image.get("split") != split:
            continue
        image_id = image.get("cocoid", numeric_id(os.path.splitext(image["filename"])[0]))
        images[image_id] = image_path(root, os.path.join(image.get("filepath", ""), image["filename"]))
        captions[image_id] = [s["raw"] for s in image["sentences"]]
    return captions, images


def read_captions(annotations: str, images_root: str, split: str = "test") -> TaskData:
    """Caption references and the images to caption, whichever of the standard layouts ``annotations`` has."""
    data = read_json(annotations, "caption annotations")
    groups: dict = {}
    if isinstance(data, list):
        captions, images = _from_lavis(data, annotations, images_root)
    elif isinstance(data, dict) and "annotations" in data:
        captions, images, groups = _from_coco(data, annotations, images_root)
    elif isinstance(data, dict) and isinstance(data.get("images"), list):
        captions, images = _from_karpathy(data, annotations, images_root, split)
    else:
        raise ValueError(f"{annotations}: not a caption annotation file (expected LAVIS's list of "
                         "{'image', 'caption'}, COCO's {'images', 'annotations'} or Karpathy's dataset_*.json)")
    items = [Item(str(image_id), path) for image_id, path in images.items()]
    return TaskData("caption", items, ids={str(k): k for k in images}, references=captions, groups=groups)
