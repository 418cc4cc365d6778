"""BLIP-2 in MLX: captioning, visual question answering and retrieval on Apple silicon (and any MLX backend)."""

from .blip2 import Blip2ForConditionalGeneration, Blip2Model
from .config import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig
from .qformer import Blip2QFormerModel
from .vision import Blip2VisionModel

__version__ = "0.1.0"
