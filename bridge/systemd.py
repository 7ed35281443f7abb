"""sd_notify without libsystemd: tell systemd we are ready, stopping, or alive.

A no-op when ``$NOTIFY_SOCKET`` is unset (not run by systemd with
``Type=notify``). Abstract sockets (``@name``) are supported. Failures to send
are logged once and never raised: the daemon must not die because systemd's
socket went away.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("bridge.systemd")
_warned = False


def notify(*states: str) -> bool:
    """Send ``READY=1``, ``STATUS=…``, ``STOPPING=1``, ``WATCHDOG=1``…; True if sent."""
    global _warned
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or not states:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall("\n".join(states).encode())
        return True
    except OSError as e:
        if not _warned:
            log.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), e)
            _warned = True
        return False
