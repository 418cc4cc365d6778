"""Processors: images -> pixel_values, prompts -> input_ids, as transformers' ``Blip2Processor`` (:mod:`.blip2`)
and ``InstructBlipProcessor`` (:mod:`.instructblip`, which adds the Q-Former's tokenizer) make them."""

from .blip2 import Blip2ImageProcessor, Blip2Processor, ImageLoadError, load_image
from .instructblip import InstructBlipProcessor

__all__ = ["Blip2ImageProcessor", "Blip2Processor", "ImageLoadError", "InstructBlipProcessor", "load_image"]
