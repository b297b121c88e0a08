"""Every exception the service can raise, mapped to an HTTP status in one place.

Handlers answer ``{"error": message}``. Client mistakes are 4xx with a message naming what was
wrong; 503 while the model is not ready; only a bug in the service itself is a 500 (and its
details stay in the log, not in the response).
"""
from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = logging.getLogger("repair.server")


class ServerError(Exception):
    """Base of the service's own errors; ``status`` is the HTTP code it maps to."""

    status = 500

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers


class BadRequest(ServerError):
    status = 400


class Unauthorized(ServerError):
    status = 401

    def __init__(self, message: str):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ServerError):
    status = 403


class NotFound(ServerError):
    status = 404


class Conflict(ServerError):
    status = 409


class PayloadTooLarge(ServerError):
    status = 413


class UnsupportedMediaType(ServerError):
    status = 415


class Unprocessable(ServerError):
    status = 422


class NotReady(ServerError):
    status = 503


def status_for(err: Exception) -> int:
    """The one mapping from an exception to an HTTP status."""
    from repair.bundle import BundleError
    from repair.images import ImageError, ImageTooLarge
    from repair.tabular import RecordError

    if isinstance(err, ServerError):
        return err.status
    if isinstance(err, ImageError):
        return 413 if isinstance(err, ImageTooLarge) else 422
    if isinstance(err, BundleError):
        return 404 if "has no version" in str(err) or "invalid version id" in str(err) else 409
    if isinstance(err, (RecordError, ValueError)):
        return 422
    return 500


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps({"error": message}).encode(), status_code=status,
                    media_type="application/json", headers=headers)


def _validation_message(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{where or 'body'}: {e.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def install(app: FastAPI) -> None:
    """Register the handlers that turn exceptions into ``{"error": ...}`` responses."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError):
        return error_response(422, _validation_message(err))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        message = err.detail if isinstance(err.detail, str) else json.dumps(err.detail)
        if err.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        if err.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        return error_response(err.status_code, message, getattr(err, "headers", None))

    async def _known(request: Request, err: Exception):
        status = status_for(err)
        if status == 500:
            log.error("internal error on %s %s", request.method, request.url.path, exc_info=err)
            return error_response(500, "internal server error (see the server log)")
        return error_response(status, getattr(err, "message", None) or str(err),
                              getattr(err, "headers", None))

    from repair.bundle import BundleError

    # Specific classes, so Starlette answers them in its exception middleware; a bare Exception
    # handler would run in the outermost middleware, which re-raises after answering.
    for cls in (ServerError, ValueError, BundleError):
        app.add_exception_handler(cls, _known)
    app.add_exception_handler(Exception, _known)
