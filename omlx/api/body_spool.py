"""A large request body, streamed off the socket into a file that the JSON worker reads itself.

aiohttp's `request.read()` gathers a body into a bytearray and copies it into bytes on the
event loop (measured: about a tenth of a second of the loop per 20 MiB body on a loaded
2-core machine, the largest share of the loop's time under eight hostile clients), and the
worker process then gets another copy through a pipe.  Spooled, each chunk is handed to a
writer thread as it arrives, the parent never holds the whole body, and the worker process
(omlx.api.json_child.loads_file) is told only the file's name.  A declared Content-Length
over the server's limit is refused before a byte of the body is read; a chunked body (no
Content-Length) is spooled as soon as it grows large.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor

from aiohttp import web

from .offload import lower_thread_priority

# Memory-backed where the system has it (Linux), so spooling is a copy, not disk I/O.
_SHM = "/dev/shm"
# One thread writes every spool file, in the order chunks arrive: writing 20 MiB (a page
# allocation and a copy per page) took ~40 ms of the event loop per body when it wrote
# itself; a file's writes and then its close run in order because there is one thread.  At
# the large lane's lower priority: the work scales with what clients send.
_writer = ThreadPoolExecutor(1, thread_name_prefix="omlx-spool", initializer=lower_thread_priority)
# Chunks a spool may have waiting for the writer (each up to the socket's read size): the
# reader waits past this, so a slow writer holds back the client, not memory.
MAX_PENDING_WRITES = 8


def spool_dir() -> str:
    return _SHM if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK) else tempfile.gettempdir()


class BodySpool:
    """The file one body is written to.  `append` hands a chunk to the writer thread,
    `finish` waits until all of it is in the file, `discard` removes the file (after any
    write still queued: the descriptor is never closed under a pending write)."""

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="omlx-body-", suffix=".json", dir=spool_dir())
        self._fd = fd
        self.size = 0
        self._pending: list[Future] = []

    async def append(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self._pending.append(_writer.submit(_write_all, self._fd, chunk))
        if len(self._pending) > MAX_PENDING_WRITES:
            await asyncio.wrap_future(self._pending.pop(0))

    async def finish(self) -> None:
        pending, self._pending = self._pending, []
        for write in pending:
            await asyncio.wrap_future(write)  # a failed write (disk full) raises here

    def discard(self) -> None:
        self._pending = []
        _writer.submit(_close_and_remove, self._fd, self.path)


def _write_all(fd: int, chunk: bytes) -> None:
    view = memoryview(chunk)
    while view:
        view = view[os.write(fd, view):]


def _close_and_remove(fd: int, path: str) -> None:
    os.close(fd)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


async def read_body(request: web.Request, max_bytes: int, spool_from: int) -> "bytes | BodySpool":
    """The body of `request`: its bytes when it is smaller than `spool_from`, else a spool
    file with all of it written.  A body without a Content-Length (chunked) is held in
    memory until it reaches `spool_from`, then spooled.  Over `max_bytes`: 413, as aiohttp
    answers it, at once when the Content-Length says so."""
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=declared)
    if declared is not None and declared < spool_from:
        return await request.read()
    held: bytearray | None = bytearray()
    spool: BodySpool | None = None
    try:
        async for chunk in request.content.iter_any():
            size = (spool.size if spool is not None else len(held)) + len(chunk)
            if size > max_bytes:
                raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=size)
            if spool is None and size < spool_from:
                held += chunk
                continue
            if spool is None:
                spool = BodySpool()
                await spool.append(bytes(held))
                held = None
            await spool.append(chunk)
        if spool is None:
            return bytes(held)
        await spool.finish()
    except BaseException:
        if spool is not None:
            spool.discard()
        raise
    return spool
