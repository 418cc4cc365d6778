"""Request schemas (pydantic). The generation fields are generated from the one declaration of generation options
(:class:`~mlx_blip2.generation.options.GenerationOptions`: type, range, help), with this server's limits
(``max_new_tokens``, ``max_beams``, text sizes) layered on top; the same models give the OpenAPI docs at ``/docs``.

JSON is validated strictly (``"5"`` is not a number, ``true`` not an integer; an integral float such as ``2.0`` is
an integer); multipart form fields are strings, converted by the type of the field they set.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from ..generation.options import OPTION_FIELDS, PUBLIC_OPTIONS, GenerationOptions, option_kind
from ..generation.recipes import OptionError, resolve_recipe
from .config import ServerConfig
from .errors import APIError

# Options whose largest value is this server's setting rather than the declaration's.
SERVER_LIMITS = {"max_new_tokens": "max_new_tokens", "min_new_tokens": "max_new_tokens",
                 "num_beams": "max_beams", "num_return_sequences": "max_beams"}
# OpenAI's names for our options: the chat endpoint takes these instead.
OPENAI_NAMES = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                "n": "num_return_sequences"}
IMAGE_HELP = ("the image: base64, a data URL (data:image/png;base64,...) or, on servers started with "
              "--allow-url-fetch, an http(s) URL; in a multipart request, a file upload. Never a path on the server")
MODEL_HELP = ("the model (optional): the server runs one, listed by /v1/models; any other name is 404 "
              "model_not_found")


class _Request(BaseModel):
    """Unknown fields are errors, NaN and infinities too; integral floats are integers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data):
        if isinstance(data, dict):
            ints = [k for k, v in data.items() if isinstance(v, float) and k in cls.model_fields
                    and "int" in str(cls.model_fields[k].annotation) and v.is_integer() and abs(v) < 2**64]
            if ints:
                data = {**data, **{k: int(data[k]) for k in ints}}
        return data


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode text") from None
    return text


def text_types(config: ServerConfig):
    """(one text, a text or a non-empty list of texts) with this server's size limits."""
    text = Annotated[str, AfterValidator(_unicode), Field(max_length=config.max_text_chars)]
    return text, Union[text, Annotated[list[text], Field(min_length=1, max_length=config.max_texts)]]


def option_field(name: str, config: ServerConfig, alias_of: str | None = None) -> tuple[Any, Any]:
    """(type, Field) of a generation option as a request field: its declared type, range and help, and this
    server's limit where it has one. ``alias_of``: the option an OpenAI-named field sets."""
    option = alias_of or name
    meta = OPTION_FIELDS[option].metadata
    if meta["choices"] is not None:
        kind: Any = Literal[tuple(meta["choices"])]
    else:
        kind = option_kind(option)
    le = meta["le"]
    if option in SERVER_LIMITS:
        limit = getattr(config, SERVER_LIMITS[option])
        le = limit if le is None else min(le, limit)
    help_text = meta["help"] + (f" (OpenAI's name for {option})" if alias_of else "")
    return Optional[kind], Field(None, ge=meta["ge"], gt=meta["gt"], le=le, description=help_text)


def generation_fields(config: ServerConfig, exclude=()) -> dict:
    return {name: option_field(name, config) for name in PUBLIC_OPTIONS if name not in exclude}


@dataclass(frozen=True)
class Schemas:
    caption: type[BaseModel]
    ask: type[BaseModel]
    chat: type[BaseModel]
    match: type[BaseModel]
    embeddings: type[BaseModel]


@functools.lru_cache(maxsize=16)
def build_schemas(config: ServerConfig) -> Schemas:
    """The request models of a server with ``config``'s limits."""
    text, texts = text_types(config)
    common = {"model": (Optional[str], Field(None, description=MODEL_HELP))}
    image = {"image": (Optional[str], Field(None, description=IMAGE_HELP))}
    caption = create_model(
        "CaptionRequest", __base__=_Request, **common, **image,
        prompt=(Optional[text], Field(None, description="text the caption continues, such as 'a photo of'")),
        **generation_fields(config))
    ask = create_model(
        "AskRequest", __base__=_Request, **common, **image,
        question=(texts, Field(..., description="a question, or a list of questions about the one image")),
        template=(Optional[text], Field(None, description="the prompt around each question, with '{}' where it "
                                                          "goes (default: 'Question: {} Answer:')")),
        **generation_fields(config))
    openai_options = {name: option_field(name, config, alias_of=ours) for name, ours in OPENAI_NAMES.items()}
    chat = create_model(
        "ChatCompletionRequest", __base__=_Request, **common,
        messages=(Any, Field(..., description="OpenAI chat messages; one user message carries the image as an "
                                              "image_url part (a data URL)")),
        stream=(Optional[bool], Field(None, description="stream server-sent events (needs num_beams=1)")),
        stream_options=(Optional[dict[str, bool]], Field(None, description="{'include_usage': true} adds a usage "
                                                                           "chunk")),
        **openai_options,
        stop=(Optional[Any], Field(None, description="not supported (must be null)")),
        frequency_penalty=(Optional[float], Field(None, description="not supported (must be 0 or null)")),
        presence_penalty=(Optional[float], Field(None, description="not supported (must be 0 or null)")),
        logprobs=(Optional[bool], Field(None, description="not supported (must be false or null)")),
        response_format=(Optional[dict[str, Any]], Field(None, description="only {'type': 'text'}")),
        user=(Optional[str], Field(None, description="accepted and ignored")),
        **generation_fields(config, exclude=set(OPENAI_NAMES.values())))
    match = create_model(
        "MatchRequest", __base__=_Request, **common, **image,
        texts=(texts, Field(..., description="a text, or a list of texts, to score against the image")),
        mode=(Literal["itm", "itc"], Field("itm", description="'itm': image-text matching probability (the ITM "
                                                              "head); 'itc': contrastive similarity")))
    embeddings = create_model(
        "EmbeddingsRequest", __base__=_Request, **common,
        input=(Optional[texts], Field(None, description="a text or a list of texts to embed (OpenAI's field); "
                                                        "or send images instead")),
        image=(Optional[Union[str, list[str]]], Field(None, description=IMAGE_HELP + "; or a list")),
        images=(Optional[list[str]], Field(None, description="images, as 'image'")),
        encoding_format=(Optional[Literal["float", "base64"]], Field(None, description="'float' (default) or "
                                                                                       "'base64' (little-endian "
                                                                                       "float32)")),
        dimensions=(Optional[int], Field(None, description="not supported: the size is fixed by the model")),
        user=(Optional[str], Field(None, description="accepted and ignored")))
    return Schemas(caption, ask, chat, match, embeddings)


# --- validation --------------------------------------------------------------------------------------------------


def _pick(errors: list[dict]) -> dict:
    """The error to report: for a field that takes a text or a list, the one of the branch the input took."""
    first = errors[0]
    same = [e for e in errors if e["loc"][:1] == first["loc"][:1]]
    if len(same) > 1 and isinstance(first.get("input"), list):
        return next((e for e in same if len(e["loc"]) > 1 and str(e["loc"][1]).startswith("list")), first)
    return first


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def error_from_validation(e: ValidationError) -> APIError:
    """The first problem of a request, as an APIError naming its field."""
    err = _pick(e.errors(include_url=False))
    loc = err["loc"]
    param = str(loc[0]) if loc else None
    where = param + "".join(f"[{p}]" for p in loc[1:] if isinstance(p, int)) if param else "the request"
    kind, ctx, msg = err["type"], err.get("ctx") or {}, err["msg"]
    if kind == "missing":
        return APIError(400, f"'{where}' is required", param)
    if kind == "extra_forbidden":
        return APIError(400, f"unknown field '{where}'", param)
    if kind == "too_short" and ctx.get("actual_length") == 0:
        return APIError(400, f"'{where}' is an empty list", param)
    if kind in ("too_long", "string_too_long") and "max_length" in ctx:
        unit = "items" if ctx.get("field_type") == "List" else "characters"
        size = f" has {ctx['actual_length']} {unit};" if "actual_length" in ctx else " is too long:"
        return APIError(400, f"'{where}'{size} at most {ctx['max_length']} {unit} are accepted", param)
    if kind == "value_error":
        return APIError(400, f"'{where}' {ctx.get('error', msg)}", param)
    msg = msg.removeprefix("Value error, ")
    return APIError(400, f"'{where}': {msg[:1].lower()}{msg[1:]}, got {_short(err.get('input'))}", param)


def validate(model: type[BaseModel], data: dict, from_form: bool = False) -> BaseModel:
    """``data`` as ``model`` (strict for JSON, converting strings for forms), or APIError naming the field."""
    try:
        return model.model_validate(data, strict=not from_form)
    except ValidationError as e:
        raise error_from_validation(e) from None


def generation_overrides(request: BaseModel) -> dict:
    """The generation options a validated request set (OpenAI's names mapped to ours)."""
    given = request.model_dump(exclude_none=True)
    out = {name: given[name] for name in PUBLIC_OPTIONS if name in given}
    for theirs, ours in OPENAI_NAMES.items():
        if theirs in given:
            out[ours] = given[theirs]
    return out


def resolve_options(recipe: dict, overrides: dict, stream: bool = False,
                    names: dict | None = None) -> GenerationOptions:
    """The task's recipe with the request's options (see :func:`mlx_blip2.generation.recipes.resolve_recipe`); a
    combination it refuses is a 400 naming the option (``names``: our option -> the request's name for it)."""
    try:
        return resolve_recipe(recipe, overrides, stream=stream, names=names)
    except OptionError as e:
        raise APIError(400, str(e), e.option) from None


def request_names(request: BaseModel) -> dict:
    """our option -> the OpenAI name a request used for it (so errors say what the client sent)."""
    given = request.model_fields_set
    return {ours: theirs for theirs, ours in OPENAI_NAMES.items() if theirs in given}


# --- OpenAPI -----------------------------------------------------------------------------------------------------


def openapi_body(model: type[BaseModel], files: tuple[str, ...] = ("image",), multipart: bool = True) -> dict:
    """An ``openapi_extra`` request body: ``model`` as JSON and, with ``multipart``, as a form whose ``files``
    fields are uploads."""
    schema = model.model_json_schema()
    content = {"application/json": {"schema": schema}}
    if multipart:
        form = copy.deepcopy(schema)
        for name in files:
            if name in form["properties"]:
                binary = {"type": "string", "format": "binary"}
                many = name == "images"
                form["properties"][name] = {"type": "array", "items": binary} if many else binary
        content["multipart/form-data"] = {"schema": form}
    return {"requestBody": {"required": True, "content": content}}
