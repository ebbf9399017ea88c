"""The one readiness poller: wait until a Triton server's /v2/health/ready answers 200 (standard library only).

Used by the embedded server and the compose deployment alike. A server whose own process (or compose run) is gone
is never taken as ready, even if something else answers on the port: `alive` is asked before and after each poll.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from typing import Callable

from packager.core.contracts import Endpoints, NotReadyError, ServerGoneError


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def wait_until_ready(
    endpoints: Endpoints,
    timeout_s: float,
    *,
    alive: Callable[[], bool] = lambda: True,
    answered_by_us: Callable[[], bool] = lambda: True,
    poll_s: float = 0.5,
    on_poll: Callable[[float], None] | None = None,
) -> float:
    """Poll `endpoints`' readiness URL; return the seconds waited, or raise ServerGoneError / NotReadyError.

    `answered_by_us` confirms a 200 came from our server (e.g. our process holds the listening sockets)."""
    url = f"{endpoints.http_url}/v2/health/ready"
    started = time.monotonic()
    while True:
        waited = time.monotonic() - started
        if not alive():
            raise ServerGoneError(f"the server stopped before {url} reported ready")
        if http_ok(url, timeout=min(5.0, poll_s + 1)) and answered_by_us() and alive():
            return waited
        if waited >= timeout_s:
            raise NotReadyError(f"{url} not ready after {timeout_s:.0f} s", waited)
        if on_poll is not None:
            on_poll(waited)
        time.sleep(poll_s)
