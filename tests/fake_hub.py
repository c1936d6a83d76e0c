"""A local HTTP server that answers like the Hugging Face hub's file API, for `omlx pull`
tests (nothing can be downloaded from the real hub here).

It serves repos from folders on disk:

    GET  /api/models?search=...                    repos whose id contains the search text
    GET  /api/models/{org}/{name}/revision/{rev}   repo info: commit sha and file list
    GET  /api/models/{org}/{name}/tree/{rev}       the file tree (sizes, blob ids, LFS sha256)
    HEAD /{org}/{name}/resolve/{rev}/{path}        file metadata headers (commit, etag, size)
    GET  /{org}/{name}/resolve/{rev}/{path}        file content, with Range support

Every request is recorded, and `fail_once` makes the first GET of a file stop after some
bytes, as a dropped connection would, to exercise resuming.  (huggingface_hub writes what it
received in 10 MiB chunks, so only a drop after the first 10 MiB leaves something to resume.)
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web


@dataclass
class Recorded:
    method: str
    path: str
    range: str | None


@dataclass
class FakeHub:
    repos: dict[str, Path]  # repo id -> folder with its files
    fail_once: dict[str, int] = field(default_factory=dict)  # file path -> bytes sent before the drop
    requests: list[Recorded] = field(default_factory=list)
    # File paths whose content is held back (the transfer stalls after its headers) while
    # they are in this set: a download caught in the middle, for cancel tests.
    held: set[str] = field(default_factory=set)
    url: str = ""

    def commit(self, repo_id: str) -> str:
        return hashlib.sha1(repo_id.encode()).hexdigest()

    def files(self, repo_id: str) -> list[Path]:
        root = self.repos[repo_id]
        return sorted(p for p in root.rglob("*") if p.is_file())

    # ------------------------------------------------------------------ handlers
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/api/models", self.search)
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", self.repo_info)
        app.router.add_get("/api/models/{org}/{name}/tree/{rev:.*}", self.tree)
        app.router.add_route("*", "/{org}/{name}/resolve/{rev}/{path:.+}", self.resolve)
        return app

    @web.middleware
    async def _record(self, request, handler):
        self.requests.append(Recorded(request.method, request.path, request.headers.get("Range")))
        return await handler(request)

    def _repo(self, request) -> str:
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        if repo_id not in self.repos:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound"},
                                   text='{"error": "Repository not found"}', content_type="application/json")
        return repo_id

    async def search(self, request):
        text = request.query.get("search", "").lower()
        limit = int(request.query.get("limit", "100"))
        found = [repo_id for repo_id in sorted(self.repos) if text in repo_id.lower()][:limit]
        return web.json_response([{"id": r, "modelId": r, "downloads": 0, "likes": 0, "private": False,
                                   "pipeline_tag": "text-generation", "tags": ["mlx"]} for r in found])

    async def repo_info(self, request):
        repo_id = self._repo(request)
        root = self.repos[repo_id]
        siblings = [{"rfilename": str(p.relative_to(root))} for p in self.files(repo_id)]
        return web.json_response({"id": repo_id, "modelId": repo_id, "sha": self.commit(repo_id),
                                  "private": False, "siblings": siblings})

    async def tree(self, request):
        repo_id = self._repo(request)
        root = self.repos[repo_id]
        entries = []
        for path in self.files(repo_id):
            data = path.read_bytes()
            entry = {"type": "file", "path": str(path.relative_to(root)), "size": len(data),
                     "oid": hashlib.sha1(data).hexdigest()}
            if path.suffix == ".safetensors":
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return web.json_response(entries)

    async def resolve(self, request):
        repo_id = self._repo(request)
        relative = request.match_info["path"]
        path = self.repos[repo_id] / relative
        if not path.is_file():
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound"})
        data = path.read_bytes()
        headers = {"X-Repo-Commit": self.commit(repo_id),
                   "ETag": f'"{hashlib.sha256(data).hexdigest()}"', "Accept-Ranges": "bytes"}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(data))})
        start = 0
        if request.headers.get("Range", "").startswith("bytes="):
            start = int(request.headers["Range"][6:].split("-")[0] or 0)
        body = data[start:]
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        response = web.StreamResponse(status=status, headers={**headers, "Content-Length": str(len(body))})
        await response.prepare(request)
        while relative in self.held:
            await asyncio.sleep(0.05)
        if relative in self.fail_once:
            cut = self.fail_once.pop(relative)
            await response.write(body[:cut])
            await asyncio.sleep(0.3)  # let the client take in what arrived
            request.transport.close()  # then the connection drops mid-file
            return response
        await response.write(body)
        await response.write_eof()
        return response


class RunningHub:
    """The fake hub on its own thread and event loop, so sync tests and subprocesses can use it."""

    def __init__(self, hub: FakeHub):
        self.hub = hub
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="fake-hub", daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        self._ready.wait(10)
        return self.hub

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._runner = web.AppRunner(self.hub.app(), access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]
        self.hub.url = f"http://127.0.0.1:{port}"
        self._ready.set()
        self._loop.run_forever()

    def __exit__(self, *exc) -> None:
        async def stop():
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
