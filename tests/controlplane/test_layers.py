"""The server's layers: the data layer refuses in its own terms (refusals.py); only the HTTP boundary speaks HTTP.

`ApiError` (an HTTP status and body) may be raised by a route, by a router module (`*_api`), by the credential checks
the routes depend on (`auth`, `ui.session`) and by the fast path; everything else raises a `refusals.Refused`, which
errors.py translates at the boundary (its STATUS table)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from picoiot import paths
from picoiot.server import refusals
from picoiot.server.errors import STATUS, from_refusal

SERVER = paths.REPO / "src" / "picoiot" / "server"
_ROUTE_METHODS = {"get", "post", "put", "patch", "delete"}
_BOUNDARY = {"auth.py", "ui/session.py", "errors.py", "hotpath.py"}


def _is_route(fn: ast.AST) -> bool:
    return any(isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr in _ROUTE_METHODS
               for d in getattr(fn, "decorator_list", ()))


def http_errors_outside_the_boundary(root: Path) -> list[str]:
    """`module:line function` of every `raise ApiError(…)` that is not in a route or a boundary module."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel in _BOUNDARY or rel.endswith("_api.py"):
            continue
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or _is_route(fn):
                continue
            for node in ast.walk(fn):
                if (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
                        and ast.unparse(node.exc.func) == "ApiError"):
                    found.append(f"{rel}:{node.lineno} {fn.name}")
        for cls in ast.walk(tree):  # an HTTP error as a base class is one too (a refusal subclassing ApiError)
            if isinstance(cls, ast.ClassDef) and any(ast.unparse(b) == "ApiError" for b in cls.bases):
                found.append(f"{rel}:{cls.lineno} class {cls.name}")
    return sorted(set(found))


def test_the_data_layer_raises_refusals_not_http_errors():
    assert http_errors_outside_the_boundary(SERVER) == []


def test_the_check_finds_an_http_error_in_the_data_layer(tmp_path):
    (tmp_path / "store.py").write_text(
        "def load(conn):\n    raise ApiError(404, 'gone')\n\n"
        "@router.get('/x')\nasync def route():\n    raise ApiError(403, 'no')\n")
    (tmp_path / "things_api.py").write_text("def check():\n    raise ApiError(422, 'bad')\n")
    assert http_errors_outside_the_boundary(tmp_path) == ["store.py:2 load"]


_KINDS = [c for c in vars(refusals).values()
          if isinstance(c, type) and issubclass(c, refusals.Refused) and c is not refusals.Refused]


@pytest.mark.parametrize("kind", _KINDS)
def test_every_refusal_has_its_status_and_keeps_its_body(kind):
    err = from_refusal(kind("what went wrong", {"path": "x"}, version=3))
    assert err.status == STATUS[kind] and 400 <= err.status < 600
    assert err.body() == {"error": "what went wrong", "detail": {"path": "x"}, "version": 3}


def test_a_refusal_to_retry_later_says_when():
    assert from_refusal(refusals.Busy("full", retry_after_s=1)).headers == {"Retry-After": "1"}
    assert from_refusal(refusals.NotFound("gone")).headers is None


def test_a_features_data_half_knows_no_http():
    # a feature split in two — `x.py` (data) and `x_api.py` (its router) — keeps FastAPI and Starlette to the router
    halves = sorted(p.with_name(p.name[:-len("_api.py")] + ".py") for p in SERVER.glob("*_api.py"))
    assert {p.stem for p in halves} >= {"config", "state", "rollouts", "telemetry", "alerting", "audit", "operators",
                                        "alarms", "ota", "events", "discovery"}
    for path in halves:
        imported = {n.module or "" for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import)
                     for a in n.names}
        assert not {m for m in imported if m.split(".")[0] in ("fastapi", "starlette")}, path.name
