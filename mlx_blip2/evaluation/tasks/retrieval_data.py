"""Retrieval test sets in LAVIS's layout (``coco_karpathy_test.json``: 5k images; ``flickr30k_test.json``: 1k),
each image with its captions; captions go through LAVIS's ``blip_caption`` text processor, as its retrieval
evaluation reads them."""

from __future__ import annotations

import re

from .captions import _lavis_id
from .data import Item, TaskData, image_path, read_json, require

MAX_WORDS = 50  # BlipCaptionProcessor's default, which LAVIS's retrieval configs keep


def lavis_caption(text: str, max_words: int = MAX_WORDS) -> str:
    """LAVIS's ``pre_caption``: lowercased, .!"()*#:;~ turned to spaces, spaces collapsed, at most ``max_words``."""
    text = re.sub(r"([.!\"()*#:;~])", " ", text.lower())
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def read_retrieval(annotations: str, images_root: str) -> TaskData:
    data = read_json(annotations, "retrieval annotations")
    if not isinstance(data, list):
        raise ValueError(f"{annotations}: not a retrieval test file (expected LAVIS's list of {{'image', 'caption'}})")
    items, texts, txt2img, img2txt = [], [], [], []
    for i, entry in enumerate(data):
        require(entry, ("image", "caption"), annotations, i)
        captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        img2txt.append(list(range(len(texts), len(texts) + len(captions))))
        for caption in captions:
            texts.append(lavis_caption(str(caption)))
            txt2img.append(i)
        items.append(Item(str(i), image_path(images_root, entry["image"])))
    ids = {item.key: _lavis_id(entry["image"]) for item, entry in zip(items, data)}
    return TaskData("retrieval", items, ids=ids, texts=texts, txt2img=txt2img, img2txt=img2txt)
