"""Typed FastAPI dependencies for the routes: `Caller`, the principal the request's token (or session) names, and
`CP`, the control plane serving the request. Both async: a sync dependency would cost a thread hop per request."""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from .auth import Principal, principal

if TYPE_CHECKING:
    from .core import ControlPlane


async def control_plane(request: Request) -> "ControlPlane":
    return request.app.state.cp


Caller = Annotated[Principal, Depends(principal)]
CP = Annotated["ControlPlane", Depends(control_plane)]
