"""`GET /metrics`: the Prometheus text exposition (behind the API key, like every route)."""

from __future__ import annotations

from aiohttp import web

from omlx.metrics import ServerMetrics


class MetricsRoutes:
    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def register(self, app: web.Application) -> None:
        app.router.add_get("/metrics", self.metrics_text)

    async def metrics_text(self, request: web.Request) -> web.Response:
        # Rendering reads every engine's statistics: cheap (no MLX work), done on the loop
        # like /health.
        response = web.Response(body=self.metrics.render())
        response.headers["Content-Type"] = self.metrics.content_type
        return response
