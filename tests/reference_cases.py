"""Inputs shared by the fixture maker and the tests, so both describe the same cases."""

import numpy as np
from PIL import Image

PROMPTS = ["a photo of", "Question: what is in the picture? Answer:", "two dogs"]
QUESTIONS = ["what is in the picture?", "how many dogs are there?"]

# Deterministic generation options checked id for id (each is run on every prompt case).
GENERATION_CASES = {
    "beam3": dict(num_beams=3),
    "beam4_lp": dict(num_beams=4, num_return_sequences=2, length_penalty=0.6, max_new_tokens=8),
    "beam3_early": dict(num_beams=3, early_stopping=True, eos_token_id=[2, 46, 31]),
    "beam2_never": dict(num_beams=2, early_stopping="never", length_penalty=1.5, eos_token_id=[2, 99]),
    "beam3_eos": dict(num_beams=3, eos_token_id=[2, 23, 99, 127, 207, 28]),
    "beam3_eos_early": dict(num_beams=3, early_stopping=True, eos_token_id=[2, 23, 99, 127, 207, 28]),
    "penalties": dict(repetition_penalty=1.5, no_repeat_ngram_size=2),
    "min_tokens": dict(min_new_tokens=5, eos_token_id=[2, 31, 46, 99, 207]),
    "multi_eos": dict(eos_token_id=[2, 31, 46, 99, 207]),
}


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
