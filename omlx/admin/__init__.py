"""The admin panel: a page served by the server itself, and the routes only it needs."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from .access import AdminAccess
from .session import Sessions, load_secret


def admin_access(home: Path) -> AdminAccess:
    return AdminAccess(Sessions(load_secret(home)))


def install_admin(app: web.Application, pool, metrics, access: AdminAccess, current_keys, home: Path,
                  started: float) -> None:
    """The panel's routes, its statistics (fed by every finished request) and its log feed."""
    from omlx.metrics.serving_stats import ServingStats

    from .log_feed import LogFeed
    from .routes import AdminRoutes

    stats = ServingStats(home / "stats.json")
    metrics.request_listeners.append(stats.request_finished)
    logs = LogFeed()
    logs.install()

    async def stop_feed(_app):
        logs.uninstall()

    app.on_cleanup.append(stop_feed)
    AdminRoutes(pool, access, current_keys, stats, logs, started).register(app)
