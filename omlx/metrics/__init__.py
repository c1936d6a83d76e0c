"""Metrics: Prometheus at /metrics, and the running statistics the admin panel shows."""

from .prometheus import ServerMetrics
from .request_timer import FinishedRequest, RequestTimer

__all__ = ["FinishedRequest", "RequestTimer", "ServerMetrics"]
