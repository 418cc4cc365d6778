"""BLIP-2 in MLX: captioning, visual question answering and retrieval, numerically faithful to transformers."""

from . import _blas

_blas.preload()  # must run before mlx.core is first imported

from .blip2 import Blip2ForConditionalGeneration, Blip2Model  # noqa: E402
from .config import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig  # noqa: E402
from .qformer import Blip2QFormerModel  # noqa: E402
from .vision import Blip2VisionModel  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Blip2Config",
    "Blip2ForConditionalGeneration",
    "Blip2Model",
    "Blip2QFormerConfig",
    "Blip2QFormerModel",
    "Blip2VisionConfig",
    "Blip2VisionModel",
    "OPTConfig",
]
