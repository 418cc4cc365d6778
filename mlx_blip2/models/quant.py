"""Rebuilding the quantized layers of a converted checkpoint before its weights load.

A converted ``config.json`` holds a ``quantization`` entry in mlx-lm's format: the defaults, plus per-layer
overrides keyed by module path::

    "quantization": {
        "group_size": 64, "bits": 4, "mode": "affine",
        "language_model.model.decoder.embed_tokens": {"group_size": 64, "bits": 6, "mode": "affine"},
        "some.layer.kept.in.float": false
    }

A layer named there is quantized with its own parameters (or kept in float for ``false``). Any other layer is
quantized when the weights hold its ``scales``, with the group size and bits read off the stored shapes (so
checkpoints whose entry lists only the defaults load too) and the default mode. Layers without ``scales`` stay
float. The weights then load strictly, so a configuration that disagrees with the files is an error.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Any

import mlx.core as mx
import mlx.nn as nn

# The keys of the ``quantization`` entry that are defaults rather than layer paths.
DEFAULT_KEYS = ("group_size", "bits", "mode")


def layer_overrides(quantization: dict[str, Any]) -> dict[str, Any]:
    """The per-layer entries of a ``quantization`` config: ``{path: {"group_size":..,"bits":..} | False}``."""
    return {k: v for k, v in quantization.items() if k not in DEFAULT_KEYS and isinstance(v, (dict, bool))}


def infer_layer_params(path: str, module: nn.Module, weights: dict[str, mx.array], mode: str) -> dict[str, Any]:
    """Group size and bits a stored layer was packed with, from the shapes of its weight and scales."""
    in_dims = module.weight.shape[-1]
    packed, scales = weights[f"{path}.weight"], weights[f"{path}.scales"]
    return {"group_size": in_dims // scales.shape[-1], "bits": packed.shape[-1] * 32 // in_dims, "mode": mode}


def quantize_from_config(model: nn.Module, quantization: dict[str, Any] | None,
                         weights: dict[str, mx.array]) -> nn.Module:
    """Swap ``model``'s layers for quantized ones as ``quantization`` (a config's entry) and ``weights`` say.

    ``weights`` are the (sanitized) checkpoint weights the model will load; they are only inspected. Returns the
    model, updated in place. A ``None`` or empty entry leaves the model as it is.
    """
    if not quantization:
        return model
    mode = quantization.get("mode", "affine")
    overrides = layer_overrides(quantization)

    def predicate(path: str, module: nn.Module):
        if path in overrides:
            params = overrides[path]
            return dict(params) if isinstance(params, dict) else bool(params)
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return infer_layer_params(path, module, weights, mode)

    nn.quantize(
        model,
        group_size=quantization.get("group_size"),
        bits=quantization.get("bits"),
        mode=mode,
        class_predicate=predicate,
    )
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedLinear:
            module.__class__ = RowsDequantizedLinear
    return model


class RowsDequantizedLinear(nn.QuantizedLinear):
    """A quantized linear layer that, on the CPU backend, multiplies several rows through a dequantized weight.

    There MLX's quantized matmul with more than one row runs at ~1 GMAC/s, so a prefill or a batch takes minutes;
    dequantizing the weight for the call and using the float (BLAS) matmul is ~30x faster. One row (a decode step)
    keeps the quantized kernel, which reads fewer bytes. GPUs always use the quantized kernel.
    """

    def __call__(self, x: mx.array) -> mx.array:
        if x.size <= x.shape[-1] or mx.default_device() != mx.cpu:
            return super().__call__(x)
        w = mx.dequantize(self.weight, self.scales, self.get("biases"), group_size=self.group_size, bits=self.bits,
                          mode=self.mode)
        y = x @ w.T.astype(x.dtype)
        y = y + self.bias if "bias" in self else y
        # Evaluated here: the dequantized weights depend on nothing but the parameters, so in one lazy graph MLX
        # may compute many of them before their products (a 4-bit 7B model peaked at 17 GB in a prefill).
        mx.eval(y)
        return y


def compute_dtype(layer: nn.Module):
    """The floating dtype a (possibly quantized) layer computes in: a quantized weight is uint32, its scales are not."""
    return layer.scales.dtype if "scales" in layer else layer.weight.dtype


# --- precision on the CPU ---------------------------------------------------------------------------------------

HALF = (mx.float16, mx.bfloat16)
# Set by dequantize_at_load(): a quantized checkpoint loaded in float32 on the CPU is dequantized once.
_DEQUANTIZE = contextvars.ContextVar("mlx_blip2_dequantize_at_load", default=False)


def precision(model: nn.Module) -> tuple[int | None, mx.Dtype | None]:
    """(bits of its quantized layers or None, the dtype its float layers compute in)."""
    bits, dtype = None, None
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            bits = bits or module.bits
            dtype = dtype or module.scales.dtype
        elif isinstance(module, (nn.Linear, nn.Embedding)) and dtype is None:
            dtype = module.weight.dtype
    return bits, dtype


def cpu_precision_note(model: nn.Module) -> str | None:
    """One line for a model that will run several times slower than it could because it runs on the CPU quantized
    or in half precision (MLX's CPU kernels for those products are slow), saying what to do instead; None when it
    is float32 or on a GPU."""
    if mx.default_device() != mx.cpu:
        return None
    bits, dtype = precision(model)
    if bits is not None:
        return (f"note: this {bits}-bit model runs on the CPU, where MLX's quantized products make it several times "
                "slower than float32 (a 4-bit caption: 61 s against 13 s); pass --dtype float32 to dequantize it "
                "once at load (in Python: mlx_blip2.models.quant.dequantize), or use the float checkpoint")
    if dtype in HALF:
        return (f"note: {str(dtype).rsplit('.', 1)[-1]} weights on the CPU: MLX's half-precision matrix products run "
                "up to 50x slower there than float32; load with --dtype float32 (dtype=mx.float32), the CPU's default")
    return None


def dequantize(model: nn.Module, dtype: mx.Dtype = mx.float32) -> int:
    """Replace ``model``'s quantized layers by float ones in ``dtype`` (mlx-lm's ``dequantize_model``): on the CPU a
    small download then runs at float speed, in float memory. Returns how many layers changed."""
    from mlx_lm.utils import dequantize_model

    count = sum(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    if count:
        dequantize_model(model)
        model.set_dtype(dtype)
        mx.eval(model.parameters())
    return count


@contextlib.contextmanager
def dequantize_at_load():
    """Within it, a quantized checkpoint loaded with ``dtype=mx.float32`` on the CPU is dequantized once (what the
    command line's ``--dtype float32`` means); elsewhere it stays quantized and gets a note."""
    token = _DEQUANTIZE.set(True)
    try:
        yield
    finally:
        _DEQUANTIZE.reset(token)


def settle_cpu_precision(model: nn.Module, dtype: mx.Dtype | None) -> nn.Module:
    """After loading: dequantized (see :func:`dequantize_at_load`), or, for a model the CPU runs slowly, a one-line
    note (a logged warning: printed once to stderr when logging is not set up)."""
    asked_float32 = dtype is not None and dtype == mx.float32
    if _DEQUANTIZE.get() and asked_float32 and mx.default_device() == mx.cpu and precision(model)[0] is not None:
        dequantize(model)
        return model
    note = cpu_precision_note(model)
    if note:
        logging.getLogger("mlx_blip2").warning(note)
    return model
