"""The admin panel at /admin: its page and static files, login, and the few JSON / SSE
routes the panel needs that the API does not already have (statistics, the log, the
downloader).  Everything else the panel does goes through the ordinary API routes (models
status, load, unload, settings, chat), under the session cookie.

    GET  /admin                        the panel (one page; no build step, no CDN)
    GET  /admin/static/...             its script and stylesheet
    GET  /admin/api/session            whether a login is needed, and the CSRF token
    POST /admin/api/login              {"api_key": ...} -> session cookie
    POST /admin/api/logout
    GET  /admin/api/stats              live per-model state, memory, totals, latency
    POST /admin/api/stats/clear        {"all_time": bool}
    GET  /admin/api/logs               recent log records (?level=info&limit=500)
    GET  /admin/api/logs/stream        the same, then new ones as server-sent events
    GET  /admin/api/hf/search?q=       hub search (HF_ENDPOINT honoured)
    GET  /admin/api/hf/files?repo=     a repo's files and sizes
    POST /admin/api/hf/download        {"repo_id": ..., "model_dir": (optional) one of the model dirs}
    GET  /admin/api/hf/tasks           downloads and their progress
    POST /admin/api/hf/cancel/{id}, /admin/api/hf/resume/{id}
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import orjson
from aiohttp import web

from omlx import __version__
from omlx.api import sse
from omlx.api.auth import presented_key
from omlx.api.errors import APIError, invalid
from omlx.api.wire import json_response
from omlx.hub import PullError
from omlx.metrics.serving_stats import ServingStats
from omlx.models.pool import ModelPool

from . import downloads as hub
from .access import AdminAccess
from .log_feed import LEVELS, LogFeed
from .session import COOKIE, OPEN_SESSION, SESSION_SECONDS

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("omlx.admin")


class AdminRoutes:
    def __init__(self, pool: ModelPool, access: AdminAccess, current_keys, stats: ServingStats,
                 logs: LogFeed, started: float):
        self.pool = pool
        self.access = access
        self.current_keys = current_keys
        self.stats = stats
        self.logs = logs
        self.started = started
        model_dirs = pool.model_dirs or [Path.home() / ".omlx" / "models"]
        self.downloads = hub.Downloads(model_dirs, on_done=lambda _task: pool.rescan())

    def register(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/admin", self.page)
        r.add_get("/admin/", self.page)
        r.add_static("/admin/static/", STATIC, append_version=False)
        r.add_get("/admin/api/session", self.session)
        r.add_post("/admin/api/login", self.login)
        r.add_post("/admin/api/logout", self.logout)
        r.add_get("/admin/api/stats", self.stats_json)
        r.add_post("/admin/api/stats/clear", self.clear_stats)
        r.add_get("/admin/api/logs", self.recent_logs)
        r.add_get("/admin/api/logs/stream", self.stream_logs)
        r.add_get("/admin/api/hf/search", self.hf_search)
        r.add_get("/admin/api/hf/files", self.hf_files)
        r.add_post("/admin/api/hf/download", self.hf_download)
        r.add_get("/admin/api/hf/tasks", self.hf_tasks)
        r.add_post("/admin/api/hf/cancel/{task_id}", self.hf_cancel)
        r.add_post("/admin/api/hf/resume/{task_id}", self.hf_resume)
        app.on_shutdown.append(self._end_streams)
        app.on_cleanup.append(self._close)

    async def _end_streams(self, _app) -> None:
        self.logs.end_streams()

    async def _close(self, _app) -> None:
        await self.downloads.close()
        self.stats.save()

    # ------------------------------------------------------------------ page and login
    async def page(self, request: web.Request) -> web.Response:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def session(self, request: web.Request) -> web.Response:
        keys = self.current_keys()
        session = self.access.session_of(request, keys)
        return json_response({"auth_required": bool(keys), "logged_in": session is not None,
                              "csrf_token": self.access.sessions.csrf_token(session) if session else None,
                              "version": __version__})

    async def login(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        key = body.get("api_key")
        if not isinstance(key, str) or not key:
            raise invalid("'api_key' must be a non-empty string", "api_key", "invalid_value")
        keys = self.current_keys()
        if not keys:
            return json_response({"logged_in": True, "csrf_token": self.access.sessions.csrf_token(OPEN_SESSION)})
        client = request.remote or "unknown"
        wait = self.access.login_blocked_for(client)
        if wait:
            error = APIError(f"too many failed logins from {client}; try again in {wait:.0f} s", 429,
                             "rate_limit_error", None, "too_many_failed_logins")
            response = error.response(request.path)
            response.headers["Retry-After"] = str(max(1, round(wait)))
            return response
        cookie = self.access.login(key, keys)
        if cookie is None:
            self.access.login_failed(client)
            log.info("admin login refused from %s: wrong API key", client)
            raise APIError("Invalid API key.", 401, "invalid_request_error", "api_key", "invalid_api_key")
        response = json_response({"logged_in": True, "csrf_token": self.access.sessions.csrf_token(cookie)})
        response.set_cookie(COOKIE, cookie, max_age=SESSION_SECONDS, path="/", httponly=True, samesite="Strict",
                            secure=request.secure)
        log.info("admin login")
        return response

    async def logout(self, request: web.Request) -> web.Response:
        response = json_response({"logged_in": False})
        response.del_cookie(COOKIE, path="/")
        return response

    def _guard(self, request: web.Request) -> None:
        """State changes from the panel carry the CSRF token (the auth middleware checks it
        under a session; a keyless server has no middleware check, so here).  A client
        sending the API key in a header needs none: no other site can make a browser send it."""
        if presented_key(request) is not None:
            return
        session = self.access.session_of(request, self.current_keys())
        if session is None:
            raise APIError("log in to the admin panel first", 401, "invalid_request_error", None, "invalid_api_key")
        self.access.check_csrf(request, session)

    # ------------------------------------------------------------------ statistics
    async def stats_json(self, request: web.Request) -> web.Response:
        pool = self.pool
        models = []
        for model_id, model in sorted(pool.loaded.items()):
            if model is None:
                continue
            entry = {"id": model_id, "memory_bytes": model.memory_bytes,
                     "kind": "llm" if model.generates else model.info.model_type}
            if model.generates:
                engine = model.engine_stats()
                kv = engine["kv_cache"]
                entry.update(
                    running=engine["running"], waiting=engine["waiting"], preemptions=engine["preemptions"],
                    prefilling=engine["prefilling"],
                    context_window=engine["context_window"],
                    **self.stats.throughput(model_id, engine["prefill_tokens"], engine["generated_tokens"]),
                    kv_cache={"block_size": kv["block_size"], "total_blocks": kv["total_blocks"],
                              "max_blocks": kv["max_blocks"], "used_blocks": kv["used_blocks"],
                              "cached_blocks": kv["cached_blocks"], "bytes": kv["bytes"], "max_bytes": kv["max_bytes"],
                              "usage": kv["used_blocks"] / (kv["max_blocks"] or 1),
                              "prefix_cache_hit_rate": kv["prefix_cache_hit_rate"]},
                    disk=_disk_summary(kv.get("disk")),
                )
            models.append(entry)
        holders = sorted(pool.ledger.holders().items(), key=lambda kv: -kv[1])
        return json_response({
            "version": __version__,
            "uptime_s": round(time.time() - self.started, 1),
            "models": models,
            "memory": {"budget_bytes": pool.memory_budget, "used_bytes": pool.used_bytes,
                       "holders": [{"holder": h, "bytes": b} for h, b in holders if b]},
            **self.stats.totals(),
        })

    async def clear_stats(self, request: web.Request) -> web.Response:
        self._guard(request)
        body = await _json_body(request)
        self.stats.clear(all_time=bool(body.get("all_time")))
        return json_response({"cleared": True, "all_time": bool(body.get("all_time"))})

    # ------------------------------------------------------------------ logs
    def _level(self, request: web.Request) -> int:
        name = request.query.get("level", "info").lower()
        if name not in LEVELS:
            raise invalid(f"'level' must be one of {', '.join(LEVELS)}", "level", "invalid_value")
        return LEVELS[name]

    async def recent_logs(self, request: web.Request) -> web.Response:
        level = self._level(request)
        try:
            limit = max(1, min(int(request.query.get("limit", "500")), 2000))
        except ValueError:
            raise invalid("'limit' must be an integer", "limit", "invalid_value") from None
        return json_response({"records": self.logs.recent(level, limit)})

    async def stream_logs(self, request: web.Request) -> web.StreamResponse:
        level = self._level(request)
        queue = self.logs.listen()  # before reading the backlog, so nothing falls in between
        try:
            response = await sse.open_stream(request)
            last = 0
            for record in self.logs.recent(level, 500):
                await response.write(sse.data_event(record))
                last = record["seq"]
            while True:
                try:
                    record = await asyncio.wait_for(queue.get(), 15)
                except asyncio.TimeoutError:
                    await response.write(sse.KEEPALIVE)
                    continue
                if record is None:  # the server is stopping
                    return response
                if record["seq"] > last and record["levelno"] >= level:
                    await response.write(sse.data_event(record))
        except (ConnectionResetError, ConnectionError):
            return response
        finally:
            self.logs.stop_listening(queue)

    # ------------------------------------------------------------------ downloader
    async def hf_search(self, request: web.Request) -> web.Response:
        query = request.query.get("q", "")
        try:
            limit = max(1, min(int(request.query.get("limit", "20")), 100))
        except ValueError:
            raise invalid("'limit' must be an integer", "limit", "invalid_value") from None
        results = await _hub(asyncio.to_thread(hub.search, query, limit))
        return json_response({"query": query, "endpoint": hub.hub_endpoint(), "models": results})

    async def hf_files(self, request: web.Request) -> web.Response:
        repo_id = request.query.get("repo", "")
        files = await _hub(asyncio.to_thread(hub.repo_files, repo_id))
        return json_response({"repo_id": repo_id, "files": files,
                              "download_bytes": sum(f["size"] or 0 for f in files if f["download"])})

    async def hf_download(self, request: web.Request) -> web.Response:
        self._guard(request)
        body = await _json_body(request)
        repo_id = body.get("repo_id")
        if not isinstance(repo_id, str):
            raise invalid("'repo_id' must be a string like 'org/name'", "repo_id", "invalid_type")
        task = await _hub(self.downloads.start(repo_id, self._model_dir(body.get("model_dir"))))
        return json_response(task.report())

    def _model_dir(self, value) -> Path | None:
        """One of the server's model dirs (a download may go into no other folder), or None."""
        if value is None:
            return None
        dirs = {str(d): d for d in self.downloads.model_dirs}
        if not isinstance(value, str) or value not in dirs:
            raise invalid(f"'model_dir' must be one of this server's model dirs: {sorted(dirs)}",
                          "model_dir", "invalid_value")
        return dirs[value]

    async def hf_tasks(self, request: web.Request) -> web.Response:
        return json_response({"tasks": [t.report() for t in self.downloads.tasks.values()],
                              "model_dirs": [str(d) for d in self.downloads.model_dirs]})

    def _task_id(self, request: web.Request) -> str:
        task_id = request.match_info["task_id"]
        if task_id not in self.downloads.tasks:
            raise APIError(f"no download {task_id!r}", 404, "not_found_error", None, "download_not_found")
        return task_id

    async def hf_cancel(self, request: web.Request) -> web.Response:
        self._guard(request)
        return json_response(self.downloads.cancel(self._task_id(request)).report())

    async def hf_resume(self, request: web.Request) -> web.Response:
        self._guard(request)
        return json_response((await self.downloads.resume(self._task_id(request))).report())


async def _hub(awaitable):
    try:
        return await awaitable
    except PullError as exc:
        raise invalid(str(exc), "repo_id", "invalid_value") from None
    except hub.HubUnreachable as exc:
        raise APIError(str(exc), 502, "server_error", None, "hub_unreachable") from None


async def _json_body(request: web.Request) -> dict:
    raw = await request.read()
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError as exc:
        raise invalid(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    return body


def _disk_summary(disk: dict | None) -> dict | None:
    if not disk:
        return None
    return {k: disk.get(k) for k in ("blocks", "bytes", "max_bytes", "hit_blocks", "written_blocks", "pending_writes")}
