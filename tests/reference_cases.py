"""Inputs shared by the fixture maker and the tests, so both describe the same cases."""

import numpy as np
from PIL import Image

PROMPTS = ["a photo of", "Question: what is in the picture? Answer:", "two dogs"]
QUESTIONS = ["what is in the picture?", "how many dogs are there?"]


def make_images() -> list[Image.Image]:
    """Three deterministic RGB images of different sizes (the processor must resize them)."""
    rng = np.random.default_rng(1234)
    sizes = [(64, 48), (30, 90), (100, 100)]
    images = []
    for w, h in sizes:
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
        noise = rng.integers(0, 60, size=(h, w, 3))
        images.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)))
    return images
