"""Fetch a request's media (an image, an audio clip) by URL, inside the media policy.

Each hop of a fetch is checked before any byte is sent: the scheme, the host against the
allowed domains, then every address the host resolves to (omlx.media_policy).  The
connection then goes to exactly those addresses: the session's resolver answers from the
checked lookup instead of asking DNS again, so a name cannot pass the check with a public
address and connect to a private one (DNS rebinding).  Redirects are followed here, not by
aiohttp, so every hop is checked the same way, up to MAX_REDIRECTS.  `file://` URLs are read
from the directory the policy allows, if any.

Every failure is a MediaFetchError with an API error code and status; the caller words it
for its media kind (omlx.vision.images for images).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from pathlib import Path

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from .media_policy import MediaPolicy, MediaURLRefused, current

MAX_REDIRECTS = 5
REDIRECT_STATUSES = {301, 302, 303, 307, 308}


class MediaFetchError(ValueError):
    def __init__(self, message: str, code: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


class _CheckedAddresses(AbstractResolver):
    """A resolver that answers only for the host it was made for, with the addresses that
    passed the policy: aiohttp connects to what was checked, and nothing else."""

    def __init__(self, host: str, results: list[dict]):
        self.host = host
        self.results = results

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict]:
        if host != self.host:  # cannot happen for a direct connection; refuse rather than look up
            raise OSError(f"{host} was not checked against the media policy")
        return [dict(r, port=port) for r in self.results if family in (socket.AF_UNSPEC, r["family"])]

    async def close(self) -> None:
        pass


async def lookup(host: str, port: int) -> list[dict]:
    """The host's addresses as aiohttp's resolvers return them (a seam tests replace)."""
    return await aiohttp.ThreadedResolver().resolve(host, port, family=socket.AF_UNSPEC)


async def fetch_url(url: str, *, max_bytes: int, timeout_s: float, what: str = "media",
                    policy: MediaPolicy | None = None, resolve=None) -> bytes:
    """The bytes at `url` (http, https or an allowed file://), at most `max_bytes`, within
    `timeout_s` for the whole fetch, redirects included.  `what` names the media kind in
    messages and error codes ("image": image_fetch_failed, ...); `resolve(host, port)` looks
    names up (default: the system's resolver)."""
    policy = policy or current()
    try:
        if url.startswith("file:"):
            return await asyncio.to_thread(_read_file, policy.local_file(url), max_bytes, what)
        return await asyncio.wait_for(_fetch(url, max_bytes, what, policy, resolve or lookup), timeout_s)
    except MediaURLRefused as exc:
        raise MediaFetchError(str(exc), "media_url_not_allowed") from None
    except asyncio.TimeoutError:
        raise MediaFetchError(f"fetching the {what} from {url} timed out after {timeout_s:g} s",
                              f"{what}_fetch_timeout") from None


async def _fetch(url: str, max_bytes: int, what: str, policy: MediaPolicy, resolve) -> bytes:
    target = _parse(url, what)
    for _ in range(MAX_REDIRECTS + 1):
        checked = await _checked_addresses(target, policy, resolve, what)
        connector = aiohttp.TCPConnector(resolver=_CheckedAddresses(target.raw_host, checked),
                                         use_dns_cache=False, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            try:
                async with session.get(target, allow_redirects=False) as response:
                    if response.status in REDIRECT_STATUSES and response.headers.get("Location"):
                        target = _parse(str(target.join(URL(response.headers["Location"]))), what)
                        continue
                    return await _body(response, str(target), max_bytes, what)
            except aiohttp.ClientError as exc:
                raise MediaFetchError(f"fetching the {what} from {target} failed: {exc}",
                                      f"{what}_fetch_failed") from None
    raise MediaFetchError(f"fetching the {what} from {url} took more than {MAX_REDIRECTS} redirects",
                          f"{what}_fetch_failed")


def _parse(url: str, what: str) -> URL:
    try:
        target = URL(url)
    except (ValueError, TypeError):
        raise MediaFetchError(f"the {what} URL {url!r} is not a valid URL", f"invalid_{what}") from None
    if target.scheme not in ("http", "https") or not target.raw_host:
        raise MediaURLRefused(f"fetching media from {url} is not allowed: only http(s) URLs are fetched")
    return target


async def _checked_addresses(target: URL, policy: MediaPolicy, resolve, what: str) -> list[dict]:
    host = target.raw_host  # as aiohttp will connect to it (an IDN name in punycode)
    policy.check_host(host, str(target))
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:  # aiohttp connects to an address literal without resolving it
        results = [{"hostname": host, "host": str(literal), "port": port, "proto": 0, "flags": 0,
                    "family": socket.AF_INET6 if literal.version == 6 else socket.AF_INET}]
    else:
        try:
            results = await resolve(host, port)
        except OSError as exc:
            raise MediaFetchError(f"fetching the {what} from {target} failed: cannot resolve {host}: {exc}",
                                  f"{what}_fetch_failed") from None
    if not results:
        raise MediaFetchError(f"fetching the {what} from {target} failed: {host} has no address",
                              f"{what}_fetch_failed")
    policy.check_addresses(host, [r["host"] for r in results], str(target))
    return results


async def _body(response: aiohttp.ClientResponse, url: str, max_bytes: int, what: str) -> bytes:
    if response.status != 200:
        raise MediaFetchError(f"fetching the {what} from {url} failed: HTTP {response.status}", f"{what}_fetch_failed")
    too_large = MediaFetchError(f"the {what} at {url} is larger than the {max_bytes} byte limit", f"{what}_too_large", 413)
    if response.content_length is not None and response.content_length > max_bytes:
        raise too_large
    data = bytearray()
    async for chunk in response.content.iter_chunked(1 << 16):
        data += chunk
        if len(data) > max_bytes:
            raise too_large
    return bytes(data)


def _read_file(path: Path, max_bytes: int, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            data = file.read(max_bytes + 1)
    except OSError as exc:
        raise MediaFetchError(f"reading the {what} file {path} failed: {exc.strerror or exc}", f"{what}_fetch_failed") from None
    if len(data) > max_bytes:
        raise MediaFetchError(f"the {what} file {path} is larger than the {max_bytes} byte limit", f"{what}_too_large", 413)
    return data
