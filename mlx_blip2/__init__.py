"""BLIP-2 in MLX: captioning, visual question answering and retrieval, numerically faithful to transformers."""

from . import _blas
from ._exports import lazy_exports

_blas.preload()  # must run before mlx.core is first imported

__version__ = "0.1.0"

# The public names, imported on first use: `import mlx_blip2.photo_index` (search, duplicates) then starts without
# loading mlx-lm and transformers, seconds on a small machine.
_EXPORTS = {
    "GenerationOptions": "generation.options",
    "open_image": "images",
    "Blip2Config": "models.blip2",
    "Blip2ForConditionalGeneration": "generation.conditional",
    "Blip2Model": "models.blip2",
    "InstructBlipConfig": "models.instructblip",
    "InstructBlipForConditionalGeneration": "generation.conditional",
    "InstructBlipModel": "models.instructblip",
    "InstructBlipQFormerModel": "models.instructblip",
    "LlamaConfig": "models.llama",
    "OPTConfig": "models.opt",
    "Blip2QFormerConfig": "models.qformer",
    "Blip2QFormerModel": "models.qformer",
    "Blip2ForImageTextRetrieval": "models.retrieval",
    "Blip2TextModelWithProjection": "models.retrieval",
    "Blip2VisionModelWithProjection": "models.retrieval",
    "T5Config": "models.t5",
    "Blip2VisionConfig": "models.vision",
    "Blip2VisionModel": "models.vision",
    "load": "pipelines",
    "Blip2ImageProcessor": "processing",
    "Blip2Processor": "processing",
    "load_image": "processing",
    "InstructBlipProcessor": "processing",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
