"""Images from requests: `data:` URLs, bare base64 and http(s) URLs, fetched and decoded
under limits, each with a hash of its decoded pixels.  URLs are fetched inside the server's
media policy (omlx.media_fetch: public addresses only unless the operator opens more, every
redirect checked); `file://` URLs only from a directory the operator allows.

Every failure is an `ImageError` naming the request field it came from, which the API layer
returns as a 4xx in the route family's shape; nothing here can take the server down.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from dataclasses import dataclass

import aiohttp

from omlx.media_payload import MediaError, MediaKind, decode_base64, fetch_media, split_data_url

# Formats Pillow decodes that clients send; others (PDF, SVG, TIFF stacks...) are refused.
FORMATS = {"PNG", "JPEG", "GIF", "WEBP", "BMP"}
MEDIA_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/gif", "image/webp", "image/bmp"}


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 << 20  # encoded size, per image
    max_pixels: int = 40_000_000  # width x height, per image (checked before decoding)
    fetch_timeout_s: float = 10.0  # whole fetch of an http(s) image
    max_images: int = 16  # per request


@dataclass(frozen=True)
class ImageSource:
    """Where a request's image comes from: `url` is a data: URL, an http(s) URL, or (with
    `base64=True`) the base64 payload itself (Anthropic's base64 source)."""

    url: str
    param: str  # the request field, for error messages
    base64: bool = False
    media_type: str | None = None


@dataclass
class DecodedImage:
    image: object  # PIL.Image.Image in RGB
    digest: bytes  # hash of the decoded pixels and their size


class ImageError(MediaError):
    default_code = "invalid_image"


IMAGE = MediaKind(error=ImageError, item="the image", data="the image", noun="image",
                  data_url_example="data:image/png;base64,...", too_large_code="image_too_large", fetch_what="image")


async def load_images(sources: list[ImageSource], limits: ImageLimits = ImageLimits(),
                      session: aiohttp.ClientSession | None = None) -> list[DecodedImage]:
    """All of a request's images, fetched concurrently, decoded off the event loop."""
    if len(sources) > limits.max_images:
        raise ImageError(f"a request may carry at most {limits.max_images} images, this one has {len(sources)}",
                         sources[limits.max_images].param, "too_many_images")
    return list(await asyncio.gather(*(load_image(s, limits, session) for s in sources)))


async def load_image(source: ImageSource, limits: ImageLimits = ImageLimits(),
                     session: aiohttp.ClientSession | None = None) -> DecodedImage:
    from omlx.api.offload import offload

    data = await _image_bytes(source, limits, session)
    return await offload(decode, data, source.param, limits, size=len(data))


async def _image_bytes(source: ImageSource, limits: ImageLimits, session) -> bytes:
    url = source.url
    if not isinstance(url, str) or not url:
        raise ImageError("the image source is empty", source.param)
    if source.base64:
        if source.media_type is not None and source.media_type.lower() not in MEDIA_TYPES:
            raise ImageError(f"unsupported image media type {source.media_type!r}; use one of "
                             f"{sorted(MEDIA_TYPES)}", source.param, "unsupported_image_format")
        return decode_base64(url, source.param, limits.max_bytes, IMAGE)
    if url.startswith("data:"):
        media, payload = split_data_url(url, source.param, IMAGE)
        if media and media not in MEDIA_TYPES:
            raise ImageError(f"unsupported image media type {media!r}; use one of {sorted(MEDIA_TYPES)}",
                             source.param, "unsupported_image_format")
        return decode_base64(payload, source.param, limits.max_bytes, IMAGE)
    if url.startswith(("http://", "https://", "file:")):
        return await _fetch(url, source.param, limits, session)
    raise ImageError("an image URL must be a data: URL or an http(s) URL", source.param)


async def _fetch(url: str, param: str, limits: ImageLimits, session=None, policy=None) -> bytes:
    """The image at an http(s) (or allowed file://) URL, inside the media policy (`policy`,
    default the server's).  `session` is accepted for older callers and not used: each hop
    of a fetch gets a connection pinned to the addresses its policy check passed."""
    return await fetch_media(url, param, limits.max_bytes, limits.fetch_timeout_s, IMAGE, policy)


def decode(data: bytes, param: str, limits: ImageLimits = ImageLimits()) -> DecodedImage:
    """Decode and check one image (CPU work: call it off the event loop)."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_bytes:
        raise ImageError(f"the image is larger than the {limits.max_bytes} byte limit", param, "image_too_large", 413)
    if not data:
        raise ImageError("the image is empty", param)
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        raise ImageError("the image data is not an image this server can decode "
                         f"(supported: {', '.join(sorted(FORMATS))})", param, "unsupported_image_format") from None
    except Exception as exc:
        raise ImageError(f"the image could not be decoded: {exc}", param) from None
    if image.format not in FORMATS:
        raise ImageError(f"unsupported image format {image.format}; use one of {', '.join(sorted(FORMATS))}",
                         param, "unsupported_image_format")
    width, height = image.size
    if width < 1 or height < 1 or width * height > limits.max_pixels:
        raise ImageError(f"the image is {width}x{height} pixels, over the limit of {limits.max_pixels} pixels",
                         param, "image_too_large", 413)
    try:
        image.load()
        rgb = image.convert("RGB")
    except Exception as exc:  # truncated or corrupt data behind a valid header
        raise ImageError(f"the image data is corrupt: {exc}", param) from None
    digest = hashlib.blake2b(f"{rgb.width}x{rgb.height}:".encode(), digest_size=16)
    digest.update(rgb.tobytes())
    return DecodedImage(rgb, digest.digest())
