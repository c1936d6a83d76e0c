"""A large request body, streamed off the socket into a file that the JSON worker reads itself.

aiohttp's `request.read()` gathers a body into a bytearray and copies it into bytes on the
event loop (measured: about a tenth of a second of the loop per 20 MiB body on a loaded
2-core machine, the largest share of the loop's time under eight hostile clients), and the
worker process then gets another copy through a pipe.  Spooled, each chunk goes to the file
as it arrives (`os.write` releases the GIL), the parent never holds the whole body, and the
worker process (omlx.api.json_child.loads_file) is told only the file's name.  A declared
Content-Length over the server's limit is refused before a byte of the body is read; a
chunked body (no Content-Length) is spooled as soon as it grows large.
"""

from __future__ import annotations

import os
import tempfile

from aiohttp import web

# Memory-backed where the system has it (Linux), so spooling is a copy, not disk I/O.
_SHM = "/dev/shm"


def spool_dir() -> str:
    return _SHM if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK) else tempfile.gettempdir()


class BodySpool:
    """The file one body was written to; `discard` removes it (the reader has read it)."""

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="omlx-body-", suffix=".json", dir=spool_dir())
        self._fd: int | None = fd
        self.size = 0

    def write(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            view = view[os.write(self._fd, view):]
        self.size += len(chunk)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


async def read_body(request: web.Request, max_bytes: int, spool_from: int) -> "bytes | BodySpool":
    """The body of `request`: its bytes when it is smaller than `spool_from`, else a spool file
    (closed, ready for a reader).  A body without a Content-Length (chunked) is held in
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
                spool.write(held)
                held = None
            spool.write(chunk)
        if spool is None:
            return bytes(held)
        spool.close()
    except BaseException:
        if spool is not None:
            spool.discard()
        raise
    return spool
