"""OpenAI's error body, and turning what went wrong into it.

Every error the server sends is ``{"error": {"message", "type", "param", "code"}}`` with the status the
OpenAI API uses: 400 for a bad request (``param`` names the field), 401 for a missing or wrong key, 404
for an unknown model or route, 413 for an oversized body, 503 (with Retry-After) when the waiting queue
is full or the server is shutting down, 500 only for a fault of the server's own.
"""

from __future__ import annotations

import json

from pydantic import ValidationError

from fastgpt.serve.protocol import UNION_FIELDS, UnsupportedField

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_bytes(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    return json.dumps(error_body(status, message, param, code)).encode()


# how pydantic tags the member of a union in an error's location: a type's name, never a field's
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _field_path(loc) -> str | None:
    """('messages', 0, 'content', 'str') -> 'messages.0.content': stop at pydantic's union-member tags."""
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts.append(str(item))
        elif isinstance(item, str) and item.isidentifier() and item not in _TYPE_TAGS:
            parts.append(item)
        else:
            break
    return ".".join(parts) or None


def from_validation_errors(errors: list[dict]) -> APIError:
    """pydantic's errors (ValidationError.errors()) as a 400 naming the first field at fault, in words a
    client can act on."""
    first = errors[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, UnsupportedField):
        return APIError(400, str(cause), param=cause.field)
    param = _field_path(first["loc"])
    same_field = [err for err in errors if _field_path(err["loc"]) == param]
    leaf = param.split(".")[-1] if param else None
    if len(same_field) > 1 and leaf in UNION_FIELDS:  # a union: say what it may be, not why each member failed
        # unless a member of the right type failed on its value (an empty list, too many stop strings)
        by_value = [err for err in same_field if not err["type"].endswith("_type")]
        if any(err["type"] == "too_short" for err in by_value):
            return APIError(400, f"{param} is empty (or holds an empty list)", param=param)
        if by_value:
            return APIError(400, f"{param}: {by_value[0]['msg']}", param=param)
        return APIError(400, f"{param} must be {UNION_FIELDS[leaf]}", param=param)
    if first["type"] == "missing":
        return APIError(400, f"{param} is required", param=param)
    if first["type"] == "literal_error":
        return APIError(400, f"{param}: {first['msg']}, got {first.get('input')!r}", param=param)
    return APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param)


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(raw: bytes) -> dict:
    """The request body as a dict, or a 400 that says why it is not one."""
    if not raw:
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got a JSON {type(data).__name__}")
    return data


def parse_request(raw: bytes, model_cls):
    data = parse_json_object(raw)
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise from_validation_errors(e.errors()) from None
