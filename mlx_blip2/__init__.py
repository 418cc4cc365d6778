"""BLIP-2 in MLX: captioning, visual question answering and retrieval, numerically faithful to transformers."""

from . import _blas

_blas.preload()  # must run before mlx.core is first imported

from .generation.options import GenerationOptions  # noqa: E402
from .images import open_image  # noqa: E402
from .models.blip2 import Blip2Config, Blip2ForConditionalGeneration, Blip2Model  # noqa: E402
from .models.opt import OPTConfig  # noqa: E402
from .models.qformer import Blip2QFormerConfig, Blip2QFormerModel  # noqa: E402
from .models.retrieval import (  # noqa: E402
    Blip2ForImageTextRetrieval,
    Blip2TextModelWithProjection,
    Blip2VisionModelWithProjection,
)
from .models.t5 import T5Config  # noqa: E402
from .models.vision import Blip2VisionConfig, Blip2VisionModel  # noqa: E402
from .pipelines import load  # noqa: E402
from .processing import Blip2ImageProcessor, Blip2Processor, load_image  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Blip2Config",
    "Blip2ForConditionalGeneration",
    "Blip2ForImageTextRetrieval",
    "Blip2ImageProcessor",
    "Blip2Model",
    "Blip2Processor",
    "Blip2QFormerConfig",
    "Blip2QFormerModel",
    "Blip2TextModelWithProjection",
    "Blip2VisionConfig",
    "Blip2VisionModel",
    "Blip2VisionModelWithProjection",
    "GenerationOptions",
    "OPTConfig",
    "T5Config",
    "load",
    "load_image",
    "open_image",
]
