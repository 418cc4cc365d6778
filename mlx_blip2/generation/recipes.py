"""Every task recipe (the generation settings a task was evaluated with, and its prompt), and the one function that
turns a recipe plus a user's options into :class:`~.options.GenerationOptions`: :func:`resolve_recipe`. The
pipelines, library captioning, the server, evaluation and fine-tuning's sample captions all call it, so an option
means the same thing at every entry point.

BLIP-2 follows Salesforce LAVIS's ``blip2_opt`` / ``blip2_t5`` ``generate`` and ``predict_answers``.

InstructBLIP follows LAVIS's ``lavis/models/blip2_models/blip2_vicuna_instruct.py`` and ``blip2_t5_instruct.py``,
and the evaluation configs in ``lavis/projects/instructblip/``:

- ``generate`` defaults (used by ``describe``, and by the transformers model card's example): 5 beams,
  ``max_length=256`` new tokens, ``min_length=1``, ``repetition_penalty=1.5``, ``length_penalty=1.0``
  (``top_p=0.9`` and ``temperature=1`` only matter when sampling);
- captioning (``caption_coco_*_eval_test.yaml``): the instruction ``"A short image caption."``, 5 beams,
  ``max_len=80``, ``min_len=10``, ``length_penalty=1``, with ``generate``'s ``repetition_penalty=1.5``;
- VQA (``qa_okvqa_*_eval.yaml`` and ``predict_answers``): the template ``"Question: {} Short Answer:"``, 5 beams,
  ``max_len=10``, ``min_len=1``, ``length_penalty=-1``, with ``repetition_penalty=1.5``.

LAVIS's ``max_length`` counts new tokens for both language models (Vicuna generates from embeddings alone, and the
T5 code passes ``max_new_tokens=max_length``), so it maps onto ``max_new_tokens`` here.
"""

from __future__ import annotations

import re

from .options import OPTION_FIELDS, PUBLIC_OPTIONS, SAMPLING_OPTIONS, GenerationOptions

# --- BLIP-2 ------------------------------------------------------------------------------------------------------

CAPTION_DEFAULTS = {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 1}
VQA_DEFAULTS = {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": 0.0}
VQA_TEMPLATE = "Question: {} Answer:"

# --- InstructBLIP ------------------------------------------------------------------------------------------------

INSTRUCT_GENERATE_DEFAULTS = {"num_beams": 5, "max_new_tokens": 256, "min_new_tokens": 1,
                              "repetition_penalty": 1.5, "length_penalty": 1.0}
INSTRUCT_CAPTION_DEFAULTS = {"num_beams": 5, "max_new_tokens": 80, "min_new_tokens": 10,
                             "repetition_penalty": 1.5, "length_penalty": 1.0}
INSTRUCT_VQA_DEFAULTS = {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "repetition_penalty": 1.5,
                         "length_penalty": -1.0}
INSTRUCT_CAPTION_PROMPT = "A short image caption."
INSTRUCT_VQA_TEMPLATE = "Question: {} Short Answer:"


class OptionError(ValueError):
    """An option (or combination) a recipe cannot run with; ``option`` is the name the user gave for it."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


def resolve_recipe(recipe: dict | None, options: dict | None = None, *, stream: bool = False,
                   names: dict | None = None) -> GenerationOptions:
    """A task's recipe overridden by the user's ``options`` (None values are unset).

    - A sampling option switches the recipe's beams to sampling.
    - A ``max_new_tokens`` below the recipe's ``min_new_tokens`` lowers the minimum; an explicit
      ``min_new_tokens`` above ``max_new_tokens`` is refused.
    - ``stream``: the recipe decodes without beams (beam search only knows its text at the end); asking for beams
      explicitly is an error.

    Raises :class:`OptionError` before any work is done, naming the first option at fault as the user spelled it:
    ``names`` maps an option to that spelling (a command-line flag, an OpenAI field).
    """
    try:
        return _resolve(dict(recipe or {}), {k: v for k, v in (options or {}).items() if v is not None}, stream)
    except ValueError as e:
        raise _named(str(e), names or {}) from None


def _resolve(recipe: dict, overrides: dict, stream: bool) -> GenerationOptions:
    for name in overrides:
        if name not in OPTION_FIELDS:
            raise ValueError(f"unknown generation option {name!r} (known: {', '.join(PUBLIC_OPTIONS)})")
    if stream:
        if overrides.get("num_beams", 1) != 1 or overrides.get("num_return_sequences", 1) != 1:
            raise ValueError("streaming needs num_beams=1 and one sequence: beam search only knows its text at the end")
        recipe = {k: v for k, v in recipe.items() if k not in ("length_penalty", "num_return_sequences")}
        recipe["num_beams"] = 1
    asked_max = overrides.get("max_new_tokens")
    if isinstance(asked_max, int) and not isinstance(asked_max, bool) and "min_new_tokens" not in overrides:
        # InstructBLIP's caption recipe asks for at least 10 tokens; a user asking for fewer means fewer.
        recipe["min_new_tokens"] = min(recipe.get("min_new_tokens", 0), asked_max)
    kwargs = {**recipe, **overrides}
    if any(k in overrides for k in SAMPLING_OPTIONS):
        kwargs.setdefault("do_sample", True)
        if kwargs["do_sample"] and "num_beams" not in overrides:
            kwargs["num_beams"] = 1  # sampling replaces the beams of the recipe
    return GenerationOptions(**kwargs)


def _named(message: str, names: dict) -> OptionError:
    """The error with each option written as the user wrote it, and the first one mentioned as its ``option``."""
    found = sorted((m.start(), m.group(0)) for name in OPTION_FIELDS
                   for m in re.finditer(rf"(?<![\w-]){name}(?!\w)", message))
    option = found[0][1] if found else None
    for name, theirs in names.items():
        message = re.sub(rf"(?<![\w-]){name}(?!\w)", theirs, message)
    return OptionError(message, names.get(option, option))
