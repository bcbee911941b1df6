"""picoiot control plane: `create_app(Settings(...))` → the ASGI app (see docs/control-plane.md)."""
from .settings import SecretStore, Settings

__all__ = ["Settings", "SecretStore", "create_app"]


def create_app(settings: Settings | None = None, services=None):
    from .app import create_app as _create
    return _create(settings, services)
