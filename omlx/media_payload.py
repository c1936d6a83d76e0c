"""The encoded bytes of a request's media part (an image or an audio clip), read the same way
for every kind: a bare base64 payload, a base64 `data:` URL, or a URL fetched inside the
server's media policy (omlx.media_fetch).

Each kind keeps its own error class, codes and wording (`MediaKind`), so a client sees the
same 4xx it always did; only the reading is shared.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass


class MediaError(ValueError):
    """A request's media part that cannot be used: `param` names the request field, `code` and
    `status` the 4xx the API layer answers with."""

    default_code = "invalid_media"

    def __init__(self, message: str, param: str, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.status = status


@dataclass(frozen=True)
class MediaKind:
    """How one kind of media names itself in errors."""

    error: type[MediaError]
    item: str  # "the image", "the audio clip": what is too large
    data: str  # "the image", "the audio data": what is not valid base64
    noun: str  # "image", "clip": what a data: URL carries
    data_url_example: str  # a well-formed data: URL, for the error message
    too_large_code: str
    fetch_what: str  # omlx.media_fetch's word for it


def decode_base64(payload: str, param: str, max_bytes: int, kind: MediaKind) -> bytes:
    """The bytes of a base64 payload, refusing before decoding one whose text alone is over
    `max_bytes` (base64 is 4 characters per 3 bytes)."""
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise kind.error(f"{kind.item} is larger than the {max_bytes} byte limit", param, kind.too_large_code, 413)
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise kind.error(f"{kind.data} is not valid base64", param) from None


def split_data_url(url: str, param: str, kind: MediaKind) -> tuple[str, str]:
    """A base64 `data:` URL's media type (lower case, "" when it names none) and payload."""
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise kind.error(f"a data: URL {kind.noun} must be base64-encoded ({kind.data_url_example})", param)
    return header[5:].split(";")[0].lower(), payload


async def fetch_media(url: str, param: str, max_bytes: int, timeout_s: float, kind: MediaKind, policy=None) -> bytes:
    """The bytes at an http(s) (or allowed file://) URL through omlx.media_fetch (the media
    policy on every hop, redirects, the size cap, the timeout), its errors in `kind`'s class."""
    from omlx.media_fetch import MediaFetchError, fetch_url

    try:
        return await fetch_url(url, max_bytes=max_bytes, timeout_s=timeout_s, what=kind.fetch_what, policy=policy)
    except MediaFetchError as exc:
        raise kind.error(exc.message, param, exc.code, exc.status) from None
