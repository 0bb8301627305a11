"""Pydantic's validation errors of a config as one line each: the dotted field, what it
must be and the value given."""

from __future__ import annotations

from typing import Any

_TEMPLATES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "extra_forbidden": "unknown field",
    "missing": "required field is missing",
    "literal_error": "must be one of {expected}",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "too_short": "must have {min_length} items",
    "too_long": "must have {max_length} items",
    "path_type": "must be a path",
}


def format_error(error: dict[str, Any]) -> str:
    """One line naming the field, what it must be and the value given."""
    path = ".".join(str(part) for part in error["loc"] if not _union_tag(part))
    value = error.get("input")
    if error["type"] in ("value_error", "assertion_error"):
        message = str(error["ctx"]["error"])
        # Model-level checks already name their field; field-level ones need the path.
        return (
            message
            if ": " in message and message.split(":")[0].count(".")
            else (f"{path}: {message}")
        )
    template = _TEMPLATES.get(error["type"])
    ctx = {
        k: int(v) if isinstance(v, float) and v.is_integer() else v
        for k, v in error.get("ctx", {}).items()
    }
    message = template.format(**ctx) if template else error["msg"]
    if error["type"] in ("extra_forbidden", "missing"):
        return f"{path}: {message}" + ("" if error["type"] == "missing" else f" (value {value!r})")
    return f"{path}: {message}, got {value!r}"


def _union_tag(part: object) -> bool:
    """Pydantic names the member of a union that failed (``value.float``); not a field."""
    if not isinstance(part, str):
        return False
    return part in ("float", "int", "str") or part.startswith("literal[")
