"""Which layers are quantized, and at how many bits: the base rule and the named mixed-bit recipes."""

from __future__ import annotations

import mlx.nn as nn

from .options import MIXED_RECIPES, QUANT_RECIPES, ConvertOptions, Predicate

# Retrieval models' ITC projections and ITM head, kept in float.
RETRIEVAL_HEADS = ("vision_projection", "text_projection", "itm_head")
# The language model's down projections, by architecture (OPT: fc2, T5: wo, Llama-style: down_proj).
DOWN_PROJECTIONS = ("fc2", "wo", "down_proj")


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """The language model's token embedding (its output head too when tied); None for retrieval models."""
    lm = getattr(model, "language_model", None)
    return None if lm is None else lm.get_input_embeddings()


def is_output_head(model: nn.Module, path: str, module: nn.Module) -> bool:
    return module is input_embeddings(model) or path.split(".")[-1] == "lm_head"


def base_predicate(model: nn.Module, quantize_vision: bool) -> Predicate:
    """Which layers are quantized at all (the group-size check is mlx-lm's ``quantize_model``'s)."""
    embed = input_embeddings(model)

    def predicate(path: str, module: nn.Module) -> bool:
        if path.startswith("vision_model."):
            return quantize_vision and isinstance(module, nn.Linear)
        if path.startswith("language_model."):
            # Linear layers and the token embedding (the output head when tied); not the position embeddings.
            return isinstance(module, nn.Linear) or module is embed
        if path.startswith(RETRIEVAL_HEADS):
            return False  # < 1M parameters, and the retrieval code casts activations to their weights' dtype
        return isinstance(module, nn.Linear)  # the Q-Former and the language projection

    return predicate


def recipe_predicate(recipe: str, model: nn.Module, group_size: int, bits: int, mode: str) -> Predicate:
    """Per-layer bits for a named recipe; the dicts it returns become the config's per-layer overrides."""
    if recipe not in QUANT_RECIPES:
        raise ValueError(f"unknown quantization recipe {recipe!r}; choose one of {', '.join(QUANT_RECIPES)}")
    if mode != "affine":
        raise ValueError(f"quantization recipes need --q-mode affine, not {mode!r}")

    def params(b: int) -> dict:
        return {"group_size": group_size, "bits": b, "mode": mode}

    if recipe == "head_8":
        return lambda path, module: params(8) if is_output_head(model, path, module) else True

    low, high = MIXED_RECIPES[recipe]
    num_layers = len(getattr(getattr(model, "language_model", None), "layers", []))

    def predicate(path: str, module: nn.Module) -> dict:
        if is_output_head(model, path, module) or not path.startswith("language_model."):
            return params(high)
        parts = path.split(".")
        index = next((int(p) for p in parts if p.isdigit()), 0)
        more = index < num_layers // 8 or index >= 7 * num_layers // 8 or (index - num_layers // 8) % 3 == 2
        if more and parts[-1] in ("v_proj", *DOWN_PROJECTIONS):
            return params(high)
        return params(low)

    return predicate


def quantize(model: nn.Module, config: dict, options: ConvertOptions, info) -> tuple[nn.Module, dict]:
    """The model quantized as ``options`` ask, and its config with mlx-lm's ``quantization`` entry."""
    from mlx_lm.utils import quantize_model

    group_size, bits = options.group_size_and_bits
    base = base_predicate(model, options.quantize_vision)
    recipe = options.quant_predicate
    if isinstance(recipe, str):
        recipe = recipe_predicate(recipe, model, group_size, bits, options.q_mode)

    def predicate(path: str, module: nn.Module):
        if not base(path, module):
            return False
        return True if recipe is None else recipe(path, module)

    info(f"Quantizing: {bits}-bit {options.q_mode}, group size {group_size}"
         + (f", recipe {options.quant_predicate}" if isinstance(options.quant_predicate, str) else ""))
    return quantize_model(model, config, group_size, bits, mode=options.q_mode, quant_predicate=predicate)
