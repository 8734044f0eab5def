"""Is a download worth starting? One quick look at the network before a library retries for minutes.

keras-hub presets and tensorflow-datasets download through libraries that retry with
back-off, for minutes when offline (docs/features.md). A TCP connection to the host,
with a short timeout, tells in seconds. Behind a proxy a direct connection proves
nothing (the proxy reaches the host, this machine may not), so then the download is
simply tried.
"""

from __future__ import annotations

import os
import socket

#: Seconds a connection to a download host may take before the run gives up (offline: fail fast).
NETWORK_TIMEOUT_S = 5.0
#: The environment variables through which requests, urllib and kagglehub use a proxy.
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def unreachable(host: str, port: int = 443) -> str:
    """Why `host` cannot be reached from here ('' when it can, or when a proxy decides)."""
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return ""
    try:
        socket.create_connection((host, port), timeout=NETWORK_TIMEOUT_S).close()
    except OSError as err:
        return f"{host} unreachable: {err}"
    return ""
