"""Ports for the processes tests start.  Fixed ports (mlx.launch's ring defaults to 32323 and
up) collide when two test processes run at once: pytest-xdist's workers, or two engineers'
runs on one machine; a run of ports that are free now avoids that."""

from __future__ import annotations

import socket


def consecutive_free_ports(count: int) -> int:
    """The first of `count` consecutive ports nothing listens on now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count >= 65535:
            continue
        sockets = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no run of free ports")


def ring_port_flags(ranks: int = 2) -> list[str]:
    """`mlx.launch` flags that give a local ring of `ranks` ranks free ports of its own (one
    per rank with its default single connection per address)."""
    return ["--starting-port", str(consecutive_free_ports(ranks))]
