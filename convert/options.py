"""What a conversion is asked to do: :class:`ConvertOptions`, checked as a whole before anything is loaded."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Union

import mlx.core as mx
import mlx.nn as nn

PROG = "mlx-blip2-convert"
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
# (group size, bits) when not given; the non-affine modes allow only these.
MODE_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUP_SIZES = (32, 64, 128)
# mlx-lm's recipe names (``mlx_lm.convert.QUANT_RECIPES``: low and high bits), mapped onto BLIP-2's layers here
# since mlx-lm's builder looks for Llama-style ``down_proj`` layers; plus ``head_8``.
MIXED_RECIPES = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_6": (3, 6), "mixed_4_6": (4, 6)}
QUANT_RECIPES = [*MIXED_RECIPES, "head_8"]
RECIPE_HELP = {
    "mixed_L_H": "L bits, H bits for the output head, the language projection, the Q-Former (and the ViT), "
                 "and the language model's v_proj and down projection (fc2) in the first and last eighths of "
                 "its layers and every third layer between (mlx-lm's choice, after llama.cpp's Q4_K_M)",
    "head_8": "the output head (token embedding) at 8 bits, everything else at --q-bits",
}

Predicate = Callable[[str, nn.Module], Union[bool, dict]]


def quantization_params(q_bits: int | None, q_group_size: int | None, q_mode: str) -> tuple[int, int]:
    """Resolve and check (group size, bits) for a mode."""
    if q_mode not in MODE_DEFAULTS:
        raise ValueError(f"unknown quantization mode {q_mode!r}; choose one of {', '.join(MODE_DEFAULTS)}")
    group_size, bits = MODE_DEFAULTS[q_mode]
    if q_mode == "affine":
        group_size, bits = q_group_size or group_size, q_bits or bits
        if bits not in AFFINE_BITS:
            raise ValueError(f"--q-bits must be one of {AFFINE_BITS} for affine quantization, not {bits}")
        if group_size not in AFFINE_GROUP_SIZES:
            raise ValueError(f"--q-group-size must be one of {AFFINE_GROUP_SIZES}, not {group_size}")
    elif (q_group_size or group_size, q_bits or bits) != (group_size, bits):
        raise ValueError(f"--q-mode {q_mode} quantizes {bits}-bit in groups of {group_size}; "
                         f"leave out --q-bits/--q-group-size or pass those")
    return group_size, bits


@dataclass(frozen=True)
class ConvertOptions:
    """How to convert (the ``mlx-blip2-convert`` flags). ``q_bits``/``q_group_size`` default to the mode's (affine: 4
    bits in groups of 64). ``dtype`` ("float16", "bfloat16", "float32" or an ``mx`` dtype) is the precision of
    everything not quantized outside the Q-Former; None: float16 (bfloat16 for T5). ``quant_predicate`` is a recipe
    name (:data:`QUANT_RECIPES`) or, as in mlx-lm, a callable ``(path, module) -> bool | dict``. ``dequantize``
    turns a quantized MLX checkpoint back into float weights. An existing target is an error unless ``force``."""

    quantize: bool = False
    q_bits: int | None = None
    q_group_size: int | None = None
    q_mode: str = "affine"
    dtype: str | None = None
    quantize_vision: bool = False
    quant_predicate: str | Predicate | None = None
    dequantize: bool = False
    upload_repo: str | None = None
    force: bool = False
    adapter: str | None = None  # a fine-tuned adapter directory fused into the weights

    def __post_init__(self):
        if isinstance(self.dtype, mx.Dtype):
            name = next((name for name, d in DTYPES.items() if d == self.dtype), str(self.dtype))
            object.__setattr__(self, "dtype", name)
        if self.quantize and self.dequantize:
            raise ValueError("choose either quantize or dequantize, not both")
        if not self.quantize and (self.quantize_vision or self.quant_predicate is not None):
            raise ValueError("--quantize-vision and --quant-predicate only apply with -q/--quantize")
        if self.quantize:
            quantization_params(self.q_bits, self.q_group_size, self.q_mode)
        if isinstance(self.quant_predicate, str) and self.quant_predicate not in QUANT_RECIPES:
            raise ValueError(f"unknown --quant-predicate {self.quant_predicate!r}; choose one of "
                             f"{', '.join(QUANT_RECIPES)}")
        if isinstance(self.quant_predicate, str) and self.q_mode != "affine":
            raise ValueError(f"quantization recipes need --q-mode affine, not {self.q_mode!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.upload_repo is not None:
            validate_upload_repo(self.upload_repo)
        if self.adapter is not None:
            from mlx_blip2.models.adapters import read_adapter_config

            read_adapter_config(self.adapter)  # a missing or malformed adapter fails before the load

    @property
    def group_size_and_bits(self) -> tuple[int | None, int | None]:
        """(group size, bits) of a quantizing conversion; (None, None) otherwise."""
        return quantization_params(self.q_bits, self.q_group_size, self.q_mode) if self.quantize else (None, None)

    def replace(self, **changes) -> ConvertOptions:
        return dataclasses.replace(self, **changes)


def validate_upload_repo(upload_repo: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(upload_repo)
    except HFValidationError as e:
        raise ValueError(f"--upload-repo {upload_repo!r} is not a valid Hub repo id: {e}") from None
