"""Errors as each API family writes them, with the HTTP status that tells clients what went wrong.

OpenAI (/v1/...):  {"error": {"message", "type", "param", "code"}}; the `openai` SDK turns the
status into BadRequestError (400), AuthenticationError (401), NotFoundError (404),
UnprocessableEntityError (422) or InternalServerError (5xx), and shows the message.
Ollama (/api/...): {"error": "message"}.

Statuses: 400 a value the engine cannot use (out of range, prompt longer than the context, a
template that fails or runs over its budget), 401 wrong API key, 403 a foreign browser origin or
Host, 404 unknown model or path, 413 a body over the size limit, 415 a body that is not JSON,
422 a body that is not JSON or has wrong types (400 for Ollama, which does not use 422), 503 the
engine is not running or is overloaded (or a PD pair's prefill server is unreachable), 502 a
PD pair's prefill server refused or cut a request. A 500 is a bug: its details go to the log
under a request id, never to the client.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("minillm.serve")

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    415: "UnsupportedMediaTypeError",
    422: "UnprocessableEntityError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
}


class APIError(StarletteHTTPException):
    """An error the client should see: status, a message naming the problem, the field.

    An HTTPException, so FastAPI lets it through while it reads a request body (see
    json_body.py) and the handler below still shapes it for the API the path belongs to.
    """

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(status_code=status, detail=message)
        self.status, self.message, self.param = status, message, param

    def __str__(self) -> str:
        return self.message


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def from_value_error(error: Exception, fields: set[str] | None = None) -> APIError:
    """A ValueError/TypeError from validation (e.g. SamplingParams) as a 400.

    Their messages start with the field's name ("temperature must be >= 0 ..."), so that word
    becomes the error's `param` when it is one of the request's fields.
    """
    message = str(error)
    first = message.split(" ", 1)[0].strip(":,")
    return APIError(400, message, first if fields and first in fields else None)


def is_ollama_path(path: str) -> bool:
    return path.startswith("/api/")


def error_response(
    request_path: str, status: int, message: str, param: str | None = None
) -> JSONResponse:
    if is_ollama_path(request_path):
        return JSONResponse({"error": message}, status_code=status)
    return JSONResponse(openai_error(status, message, param), status_code=status)


def openai_error(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "Error"),
            "param": param,
            "code": status,
        }
    }


def describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """pydantic's error list -> one sentence naming each bad field, and the first field."""
    parts, first_field = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx", {}).get("error", "")
            return f"the request body is not valid JSON ({ctx})".replace(" ()", ""), None
        if err.get("type") == "model_attributes_type" or (
            not loc and err.get("type") == "dict_type"
        ):
            return "the request body must be a JSON object", None
        first_field = first_field or (loc[0] if loc else None)
        parts.append(
            f"{where or 'body'}: {err.get('msg', 'invalid value')}"
            + (
                f" (got {json.dumps(err['input'])[:80]})"
                if "input" in err and err.get("type") != "missing" and _jsonable(err["input"])
                else ""
            )
        )
    return "invalid request: " + "; ".join(parts), first_field


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request.url.path, exc.status, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(exc)
        status = 400 if is_ollama_path(request.url.path) else 422
        return error_response(request.url.path, status, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(request.url.path, exc.status_code, message)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request.url.path, 500, internal_error(request.url.path, exc))


def internal_error(where: str, exc: BaseException) -> str:
    """Log a bug with its traceback under a fresh id; the client's message gives only the id
    (exception text can carry paths, prompts or internals)."""
    error_id = f"err-{uuid.uuid4().hex[:12]}"
    log.error("internal error %s on %s", error_id, where, exc_info=exc)
    return f"internal server error (id {error_id}; the server log has the details)"
