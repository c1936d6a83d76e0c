"""The aiohttp application's key for its model pool, in a module of its own: route modules
that need the pool read it without importing omlx.server, which imports every route module."""

from __future__ import annotations

from aiohttp import web

from omlx.models.pool import ModelPool

POOL = web.AppKey("pool", ModelPool)
