"""What TGI's and OpenAI's pydantic models share: their base classes, and the one translation of
pydantic's errors into the API's messages.

A request model is the single source of truth for a body: it validates it and it is the body's
schema in `/openapi.json`. Bounds are pydantic constraints (so the document shows them); the
message a client gets when one is broken is TGI's, given next to the field as a `Refusal`.
"""

import typing
from dataclasses import dataclass

import pydantic
from pydantic import BaseModel, ConfigDict
from pydantic.fields import FieldInfo

from router.http.errors import ValidationError


@dataclass(frozen=True, slots=True)
class Refusal:
    """The message for a value that breaks its field's constraints, put in the field's
    `Annotated[...]` beside the `Field(...)` constraints it explains. It may name `{name}` (the
    field as the client wrote it), `{value}` (the value given) and `{context}` (the validation
    context). Type errors keep their generic message unless `types` is set (for unions, whose
    type errors would name one member)."""

    message: str
    types: bool = False


class RequestBody(BaseModel):
    """A request body: JSON types as given (no coercion of "1" to 1), finite numbers, unknown
    fields ignored (as TGI's serde does), null meaning unset; field docstrings are the schema's
    descriptions."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore", use_attribute_docstrings=True)


class ResponseBody(BaseModel):
    """A response body: every field with a default is still always sent (so the schema lists it as
    required), unless it is declared `exclude_if`."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=True, use_attribute_docstrings=True)


def dump(body: BaseModel, exclude: set[str] | None = None) -> str:
    """A body's JSON as sent: ASCII only, as `json.dumps` writes it, so that a client that decodes
    an event stream as Latin-1 (`requests` does, for `text/event-stream`) still reads it right."""
    return body.model_dump_json(ensure_ascii=True, exclude=exclude)


class ErrorResponse(ResponseBody):
    """Every error before a response starts, and TGI's error events."""

    error: str
    """The message; validation errors start with `Input validation error: `."""
    error_type: str
    """`bad_request` (400, also 404/405), `authentication` (401), `payload_too_large` (413), `validation`,
    `template_error`, `tool_error`, `empty_array`, `suffix not supported`, `batch size exceeded` (422),
    `generation` (424), `overloaded` (429), `internal` (500), `healthcheck` (503)."""


_TYPE_NAMES = {
    "int_type": "int",
    "float_type": "float",
    "bool_type": "bool",
    "string_type": "string",
    "list_type": "array",
    "dict_type": "object",
    "model_type": "object",
    "model_attributes_type": "object",
}
_BOUNDS = {
    "greater_than": "be > {gt}",
    "greater_than_equal": "be >= {ge}",
    "less_than": "be < {lt}",
    "less_than_equal": "be <= {le}",
    "too_short": "have at least {min_length} item(s)",
    "too_long": "have at most {max_length} item(s)",
    "literal_error": "be {expected}",
}


def _nested_model(annotation: object) -> type[BaseModel] | None:
    """The model inside `X | None`, `list[X]` and the like, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (model := _nested_model(arg)) is not None:
            return model
    return None


def _refusal(field: FieldInfo) -> Refusal | None:
    """The field's Refusal, also where it annotates a member of `X | None`."""
    found = [m for m in field.metadata if isinstance(m, Refusal)]
    pending = [field.annotation]
    while pending and not found:
        annotation = pending.pop()
        found = [m for m in getattr(annotation, "__metadata__", ()) if isinstance(m, Refusal)]
        pending += typing.get_args(annotation)
    return found[0] if found else None


def _describe(model: type[BaseModel], error: dict) -> tuple[str, Refusal | None]:
    """(the field's name as the client wrote it, its Refusal if it has one) for an error's location.
    A field of a nested object is named alone (`top_p`, not `parameters.top_p`, as TGI does), one
    inside an array after its index (`messages[0].role`)."""
    name, refusal, indexed = "", None, False
    for part in error["loc"]:
        field = model.model_fields.get(part) if model is not None and isinstance(part, str) else None
        if field is not None:
            name = f"{name}.{part}" if indexed else part
            refusal = _refusal(field)
            model, indexed = _nested_model(field.annotation), False
        elif isinstance(part, int):
            name, indexed = f"{name}[{part}]", True
    return name, refusal


def refusal_message(model: type[BaseModel], exc: pydantic.ValidationError, context: object = None) -> str:
    """The client's message for the first of `exc`'s errors."""
    error = exc.errors(include_url=False)[0]
    kind, ctx = error["type"], error.get("ctx", {})
    name, refusal = _describe(model, error)
    is_type_error = kind in _TYPE_NAMES or kind.endswith("_type")
    if kind in ("value_error", "assertion_error"):
        return str(ctx["error"])
    if not name:
        return "the request body must be a JSON object"
    if kind == "missing":
        return f"missing field `{name}`"
    if kind == "finite_number":
        return f"`{name}` must be a finite number"
    if refusal is not None and (refusal.types or not is_type_error):
        return refusal.message.format(name=name, value=error.get("input"), context=context)
    if is_type_error:
        return f"`{name}` must be of type {_TYPE_NAMES.get(kind, kind.removesuffix('_type'))}"
    if kind in _BOUNDS:
        return f"`{name}` must {_BOUNDS[kind].format(**ctx)}. Given: {error.get('input')}"
    return f"`{name}`: {error['msg']}"


M = typing.TypeVar("M", bound=BaseModel)


def parse(model: type[M], body: object, context: object = None) -> M:
    """`body` validated as `model` (with `context` for the rules that depend on the server's
    flags); any refusal raises `ValidationError` with the API's message."""
    try:
        return model.model_validate(body, context=context)
    except pydantic.ValidationError as e:
        raise ValidationError(refusal_message(model, e, context)) from None
