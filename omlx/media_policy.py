"""Which media URLs (images, audio) the server may fetch on a client's behalf.

A server shared by many clients must not become their way into the networks it can reach:
a request's `image_url` of http://127.0.0.1:8080/admin, http://169.254.169.254/ (a cloud's
metadata service) or a name that resolves to a private address would otherwise be fetched
from inside.  By default only hosts whose every address is public are fetched; the check is
made on the addresses a name resolves to (omlx.media_fetch connects to exactly those, so a
second lookup cannot answer differently), and again on every redirect.

Operators open what they need: `--allowed-media-domains` (vLLM's name) limits fetches to
those hosts, `--allow-local-media-urls` lets non-public addresses through, and `file://`
URLs are read only from under `--allowed-local-media-path` (vLLM's name).

The policy is set once per process at start-up (`configure`); every media kind reads the
same one (`current`).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

# Well-known NAT64 prefix (RFC 6052): its addresses carry an IPv4 address in the last 32 bits.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class MediaURLRefused(ValueError):
    """The policy forbids fetching this URL: the client's input, answered 400."""


@dataclass(frozen=True)
class MediaPolicy:
    # Hostnames that may be fetched (lower case, exact match); None: any host.
    allowed_domains: frozenset[str] | None = None
    # Let URLs reach loopback, private, link-local and other non-public addresses.
    allow_local: bool = False
    # file:// URLs are read only from under this directory (None: refused).
    local_media_dir: Path | None = None

    @classmethod
    def from_options(cls, domains=None, allow_local: bool = False, local_dir: str | None = None) -> "MediaPolicy":
        if isinstance(domains, str):
            domains = domains.split(",")
        names = None
        if domains:
            names = frozenset(d.strip().lower().rstrip(".") for d in domains if d and d.strip())
        directory = Path(local_dir).expanduser().resolve() if local_dir else None
        return cls(names or None, bool(allow_local), directory)

    def check_host(self, host: str, url: str) -> None:
        """Refused unless `host` is allowed by name (the address check comes after DNS)."""
        if self.allowed_domains is None:
            return
        if host.lower().rstrip(".") not in self.allowed_domains:
            raise MediaURLRefused(f"fetching media from {url} is not allowed: its host {host!r} is not among "
                                  "the server's allowed media domains")

    def check_addresses(self, host: str, addresses: list[str], url: str) -> None:
        """Refused when any address `host` resolved to is not public (unless allowed)."""
        if self.allow_local:
            return
        for address in addresses:
            if not is_public_address(address):
                raise MediaURLRefused(
                    f"fetching media from {url} is not allowed: {host} resolves to {address}, which is not a public "
                    "address (a server started with --allow-local-media-urls fetches such URLs)")

    def local_file(self, url: str) -> Path:
        """The file a file:// URL names, when it lies under the allowed directory."""
        if self.local_media_dir is None:
            raise MediaURLRefused(f"reading {url} is not allowed: local media files are refused (a server started "
                                  "with --allowed-local-media-path DIR reads file:// URLs from under DIR)")
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise MediaURLRefused(f"reading {url} is not allowed: a file:// URL must name a local file, "
                                  f"not one on {parts.netloc!r}")
        path = Path(unquote(parts.path))
        if not path.is_absolute():
            raise MediaURLRefused(f"reading {url} is not allowed: a file:// URL must give an absolute path")
        real = Path(os.path.realpath(path))  # symlinks and .. cannot lead out of the directory
        if real != self.local_media_dir and self.local_media_dir not in real.parents:
            raise MediaURLRefused(f"reading {url} is not allowed: it is outside the directory local media may be "
                                  "read from")
        return real


def is_public_address(address: str) -> bool:
    """Whether an address is globally reachable: not loopback, private, link-local, shared
    (CGNAT), multicast, reserved, unspecified or documentation, for IPv4 and IPv6, looking
    inside IPv6 forms that carry an IPv4 address (mapped, NAT64, 6to4, Teredo)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone id says nothing here
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is None and ip.teredo is not None:
            embedded = ip.teredo[1]
        if embedded is not None and not is_public_address(str(embedded)):
            return False
    return ip.is_global and not ip.is_multicast


_current = MediaPolicy()


def configure(policy: MediaPolicy) -> None:
    """Set the process's media policy (at start-up, before serving)."""
    global _current
    _current = policy


def current() -> MediaPolicy:
    return _current
