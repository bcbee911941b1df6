"""/health, /ready, /metrics."""
from __future__ import annotations

import os

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .db import LATEST, applied_version
from .deps import CP
from .models import Health, Ready

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=Health)
async def health(response: Response) -> Health:
    """The process is alive and serving (header `X-Picoiot-Pid`: which worker answered, with `--workers N`)."""
    response.headers["X-Picoiot-Pid"] = str(os.getpid())
    return Health(status="ok")


@router.get("/ready", response_model=Ready, responses={503: {"model": Ready}})
async def ready(request: Request, cp: CP) -> JSONResponse:
    """The database is reachable and every migration is applied (503 otherwise)."""
    try:
        version = await _applied(cp)
        ok = version == LATEST
        body = Ready(ready=ok, database=True, migrations=version, expected_migrations=LATEST,
                     error=None if ok else "migrations pending")
    except Exception as e:  # the point of /ready is to say so instead of failing
        body = Ready(ready=False, database=False, expected_migrations=LATEST, error=type(e).__name__)
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


async def _applied(cp) -> int | None:
    return await anyio.to_thread.run_sync(applied_version, cp.db.engine, limiter=cp.db.limiter)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request, cp: CP) -> Response:
    """Prometheus text exposition."""
    return Response(generate_latest(cp.metrics.registry), media_type=CONTENT_TYPE_LATEST)
