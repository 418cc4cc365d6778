"""Fitting training into memory: recomputed activations for frozen stacks, and a quantized frozen language model.

A frozen stack that gradients still pass through (the language model when the Q-Former or LoRA trains, the
Q-Former when only the ViT trains) would keep every layer's activations for the backward pass. Each of its layers
runs under ``mx.checkpoint`` instead, which keeps the layer's input only and recomputes the rest when the gradient
arrives. QLoRA: the language model's linear layers and embeddings are quantized in memory; LoRA's own matrices stay
float and train.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..models.adapters import block_stacks


def checkpoint_layer(layer: nn.Module) -> None:
    """Run this one layer (not its class) under ``mx.checkpoint``; its parameter names are unchanged."""
    base = type(layer)
    if getattr(base, "_checkpointed", False):
        return

    def __call__(self, *args, **kwargs):
        # Array arguments go through mx.checkpoint (gradients reach them: T5's encoder output, the ViT's
        # features); the rest (None, caches, ints) are closed over.
        names = [i for i, a in enumerate(args) if isinstance(a, mx.array)]
        keys = [k for k, a in kwargs.items() if isinstance(a, mx.array)]

        def inner(params, *arrays):
            self.update(params)
            a, kw = list(args), dict(kwargs)
            for i, v in zip(names, arrays):
                a[i] = v
            for k, v in zip(keys, arrays[len(names):]):
                kw[k] = v
            return base.__call__(self, *a, **kw)

        return mx.checkpoint(inner)(self.trainable_parameters(), *[args[i] for i in names],
                                    *[kwargs[k] for k in keys])

    layer.__class__ = type(f"Checkpointed{base.__name__}", (base,), {"__call__": __call__, "_checkpointed": True})


def frozen_stacks(model: nn.Module, groups) -> list[list[nn.Module]]:
    """The layer stacks that are frozen but back-propagated through for these trained groups."""
    stacks = list(block_stacks(model.language_model))  # the loss is computed at its end, whatever trains
    if "vit" in groups and "qformer" not in groups:
        stacks.append(model.qformer.encoder.layer)
    return stacks


def checkpoint_frozen_stacks(model: nn.Module, groups) -> int:
    """Checkpoint every layer of the frozen stacks; returns how many layers."""
    count = 0
    for stack in frozen_stacks(model, groups):
        for layer in stack:
            checkpoint_layer(layer)
            count += 1
    return count


def quantize_language_model(model: nn.Module, bits: int = 4, group_size: int = 64) -> int:
    """Quantize the language model's float linear layers and embeddings in place; returns how many."""
    count = 0

    def predicate(path: str, module: nn.Module) -> bool:
        nonlocal count
        ok = isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.shape[-1] % group_size == 0
        count += ok
        return ok

    nn.quantize(model.language_model, group_size=group_size, bits=bits, class_predicate=predicate)
    mx.eval(model.parameters())
    return count


class DequantizingLinear(nn.QuantizedLinear):
    """A frozen quantized layer in training: several rows go through the weight dequantized for the call (the CPU's
    quantized product is slow), one row through the quantized kernel. Unlike inference's
    ``models.quant.RowsDequantizedLinear`` it never evaluates inside the call: an evaluation inside a function under
    ``value_and_grad`` keeps the graph before it, with every intermediate array, alive until the backward pass."""

    def __call__(self, x: mx.array) -> mx.array:
        if x.size <= x.shape[-1] or mx.default_device() != mx.cpu:
            return nn.QuantizedLinear.__call__(self, x)
        w = mx.dequantize(self.weight, self.scales, self.get("biases"), group_size=self.group_size, bits=self.bits,
                          mode=self.mode)
        y = x @ w.T.astype(x.dtype)
        return y + self.bias if "bias" in self else y


class DequantizingEmbedding(nn.QuantizedEmbedding):
    """A quantized (tied) embedding whose output-head product dequantizes for several rows, as above."""

    def as_linear(self, x: mx.array) -> mx.array:
        if x.size <= x.shape[-1] or mx.default_device() != mx.cpu:
            return nn.QuantizedEmbedding.as_linear(self, x)
        w = mx.dequantize(self.weight, self.scales, self.get("biases"), group_size=self.group_size, bits=self.bits,
                          mode=self.mode)
        return x @ w.T.astype(x.dtype)


def prepare_quantized_for_training(module: nn.Module) -> int:
    """Swap the quantized layers of a back-propagated stack for the training variants above; returns how many."""
    count = 0
    for _, layer in module.named_modules():
        if isinstance(layer, nn.QuantizedLinear) and not isinstance(layer, DequantizingLinear):
            layer.__class__ = DequantizingLinear
            count += 1
        elif type(layer) is nn.QuantizedEmbedding:
            layer.__class__ = DequantizingEmbedding
            count += 1
    return count
