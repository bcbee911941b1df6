"""One exception type for every API error, and the handlers that turn everything into `{"error": …}` JSON."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from sqlalchemy.exc import DataError
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .db import DatabaseBusy
from .refusals import (Busy, Conflict, Forbidden, Invalid, Malformed, NotFound, Refused, Throttled, TooLarge,
                       Unauthenticated)


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: Any = None, headers: dict[str, str] | None = None,
                 **extra: Any):
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers
        self.extra = extra

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.error}
        if self.detail is not None:
            out["detail"] = self.detail
        out.update(self.extra)
        return out

    def response(self) -> JSONResponse:
        """The answer, as the app's handler and the fast path (hotpath.py) both render it."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


#: the HTTP status of each refusal of the data layer (refusals.py): the one place the two meet
STATUS: dict[type[Refused], int] = {Malformed: 400, Unauthenticated: 401, Forbidden: 403, NotFound: 404, Conflict: 409,
                                    TooLarge: 413, Invalid: 422, Throttled: 429, Busy: 503}


def from_refusal(e: Refused) -> ApiError:
    status = next((STATUS[cls] for cls in type(e).__mro__ if cls in STATUS), 400)
    headers = {"Retry-After": str(e.retry_after_s)} if e.retry_after_s is not None else None
    return ApiError(status, e.error, e.detail, headers=headers, **e.extra)


def error_response(status: int, error: str, detail: Any = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return ApiError(status, error, detail, headers=headers).response()


def _loc_path(loc: tuple) -> str:
    # ("body", "state", "reported") -> "state.reported"; ("query", "wait") -> "wait"
    parts = [str(p) for p in loc[1:]] if loc and loc[0] in ("body", "query", "path", "header") else [str(p) for p in loc]
    return ".".join(parts)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(Refused)
    async def _refused(_req: Request, exc: Refused):
        return from_refusal(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError):
        errors = exc.errors()
        for e in errors:
            if e.get("type") == "json_invalid":
                return error_response(400, "malformed JSON", {"message": str(e.get("ctx", {}).get("error", ""))})
        first = errors[0] if errors else {}
        where = tuple(first.get("loc", ()))
        msg = first.get("msg", "")
        if first.get("type") == "unstorable":  # models._storable: the offending value's path inside the model
            where += tuple(first["ctx"]["at"].split("."))
        path = _loc_path(where)
        if first.get("type") in ("unstorable", "string_unicode"):
            msg = f"{msg} at {path}"
        return error_response(422, "invalid request", {"path": path, "in": where[0] if where else None,
                                                       "message": msg})

    @app.exception_handler(DatabaseBusy)
    async def _busy(_req: Request, exc: DatabaseBusy):
        return error_response(503, "server busy, retry later", {"limit": "database queue"},
                              headers={"Retry-After": "1"})

    @app.exception_handler(DataError)
    async def _data(_req: Request, exc: DataError):
        # the last line of defence: a value the database cannot hold (validation should have caught it)
        return error_response(400, "value out of range or not storable")

    @app.exception_handler(Exception)
    async def _bug(_req: Request, exc: Exception):
        # a bug still answers in the API's one error format; Starlette re-raises it after this, so the server
        # logs the traceback (and the request's transaction, if any, was never committed)
        return error_response(500, "internal server error", {"type": type(exc).__name__})

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, exc: StarletteHTTPException):
        msg = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 400 and msg == "There was an error parsing the body":
            msg = "malformed JSON (unparseable or nested too deeply)"
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Starlette names only the first route of the path; a path has several
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(req))}
        return error_response(exc.status_code, msg.lower() if exc.status_code in (404, 405) else msg,
                              headers=headers)


def allowed_methods(req: Request) -> list[str]:
    """Every method some route serves at this request's path."""
    path = req.scope["path"]
    methods: set[str] = set()
    todo = list(req.app.router.routes)
    while todo:
        route = todo.pop()
        inner = getattr(route, "original_router", None)  # an included router (FastAPI keeps it whole)
        if inner is not None:
            todo.extend(inner.routes)
            continue
        regex = getattr(route, "path_regex", None)
        if regex is not None and getattr(route, "methods", None) and regex.match(path):
            methods |= set(route.methods)
    return sorted(methods)
