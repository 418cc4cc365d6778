"""Generation options, declared once: type, range, default and help of each (the task recipes built on them are in
:mod:`.recipes`).

``generate``, ``stream_generate``, the engine, the pipelines, library captioning, the CLI (its flags are generated
from :data:`OPTION_FIELDS`) and the server (its request schema is generated from it too) all read this module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence, Union


def _option(default, help: str, *, ge=None, gt=None, le=None, public: bool = True, choices=None):
    """A dataclass field with its range and help text. ``public``: exposed as a CLI flag and a request field."""
    return field(default=default, metadata={"help": help, "ge": ge, "gt": gt, "le": le, "public": public,
                                            "choices": choices})


@dataclass(frozen=True)
class GenerationOptions:
    """transformers' ``generate`` options (the subset BLIP-2 uses), validated on construction."""

    max_new_tokens: int = _option(20, "most tokens to generate", ge=1)
    min_new_tokens: int = _option(0, "fewest tokens to generate", ge=0)
    num_beams: int = _option(1, "beam width (1 = greedy or sampling)", ge=1)
    num_return_sequences: int = _option(1, "sequences returned per input (at most num_beams)", ge=1)
    length_penalty: float = _option(1.0, "beam score length exponent", ge=-100, le=100)
    early_stopping: Union[bool, str] = _option(False, "beam search stops when num_beams hypotheses finished",
                                               choices=(False, True, "never"))
    do_sample: bool = _option(False, "sample instead of greedy decoding")
    temperature: float = _option(1.0, "sampling temperature", ge=0)
    top_k: int = _option(0, "sample from the k most likely tokens (0 = all)", ge=0)
    top_p: float = _option(1.0, "sample from the smallest set of tokens with this probability", gt=0, le=1)
    min_p: float = _option(0.0, "drop tokens less likely than min_p times the most likely one", ge=0, le=1)
    repetition_penalty: float = _option(1.0, "penalise tokens already in the text (>1)", gt=0, le=100)
    no_repeat_ngram_size: int = _option(0, "forbid repeating n-grams of this size", ge=0, le=64)
    seed: Union[int, None] = _option(None, "random seed for sampling", ge=0, le=2**64 - 1)
    eos_token_id: Union[int, Sequence[int], None] = _option(None, "end-of-sequence id(s)", public=False)
    pad_token_id: Union[int, None] = _option(None, "id that pads ended rows", public=False)
    interpolate_pos_encoding: bool = _option(False, "images at another resolution than the checkpoint's",
                                             public=False)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check_value(f.name, getattr(self, f.name))
        if self.num_return_sequences > self.num_beams:
            raise ValueError("num_return_sequences must be between 1 and num_beams")
        if self.do_sample and self.num_beams > 1:
            raise ValueError("sampling with beams (beam-sample) is not supported")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) must not exceed max_new_tokens "
                             f"({self.max_new_tokens})")

    def replace(self, **changes) -> GenerationOptions:
        return dataclasses.replace(self, **changes)

    def to_dict(self, public_only: bool = False) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not public_only or f.metadata["public"]}


def eos_id_list(eos_token_id: Union[int, Sequence[int], None]) -> list[int]:
    """An end-of-sequence setting (one id, several, or None for none) as a list of ids."""
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


OPTION_FIELDS = {f.name: f for f in dataclasses.fields(GenerationOptions)}
PUBLIC_OPTIONS = tuple(name for name, f in OPTION_FIELDS.items() if f.metadata["public"])
SAMPLING_OPTIONS = ("temperature", "top_p", "top_k", "min_p")
_KINDS = {"int": int, "float": float, "bool": bool}


def option_flag(name: str) -> str:
    """The command line's spelling of an option: ``max_new_tokens`` -> ``--max-new-tokens``."""
    return "--" + name.replace("_", "-")


# Each public option's flag, for messages to command-line users (see ``recipes.resolve_recipe(names=)``).
OPTION_FLAGS = {name: option_flag(name) for name in PUBLIC_OPTIONS}


def option_kind(name: str) -> type:
    """The scalar type of a public option (int, float or bool); ``early_stopping`` is bool or "never"."""
    annotation = str(OPTION_FIELDS[name].type)
    return next((kind for key, kind in _KINDS.items() if key in annotation), str)


def check_value(name: str, value) -> None:
    """ValueError naming ``name`` when ``value`` is outside its declared range or choices."""
    if name not in OPTION_FIELDS:
        raise ValueError(f"unknown generation option {name!r} (known: {', '.join(OPTION_FIELDS)})")
    meta = OPTION_FIELDS[name].metadata
    if value is None or name in ("eos_token_id",):
        return
    if meta["choices"] is not None:
        if not any(value is c or (type(value) is type(c) and value == c) for c in meta["choices"]):
            raise ValueError(f"{name} must be one of {', '.join(map(repr, meta['choices']))}, got {value!r}")
        return
    if isinstance(value, bool) and option_kind(name) is not bool:
        raise ValueError(f"{name} must be a number, got {value!r}")
    ge, gt, le = meta["ge"], meta["gt"], meta["le"]
    if (ge is not None and value < ge) or (gt is not None and value <= gt) or (le is not None and value > le):
        low = f"[{ge}" if ge is not None else f"({gt}" if gt is not None else "(-inf"
        raise ValueError(f"{name} must be in {low}, {le if le is not None else 'inf'}{']' if le is not None else ')'}"
                         f", got {value}")
