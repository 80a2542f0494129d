"""Limits for an endpoint that anyone on the pod network can reach: the progress server.

Three guards, each against one way a client without a valid token can starve the server:

- `ConnectionLimiter`: at most N open connections in all and M per client address. A connection
  over either cap is closed as it is accepted, before any HTTP parsing, so a flood of half-open
  connections holds at most N file descriptors however long it lasts.
- `TokenBucket`: a rate with a burst, for work a request makes the server do elsewhere (a
  TokenReview per unknown token). Requests beyond it get 429 at once rather than a queue.
- `ThrottledLog`: one warning per reason per interval, with a count, so a flood of refused
  requests writes a few lines a minute instead of one per request.

Slow clients are the HTTP server's business: aiohttp closes a connection that has not sent a
whole request head within its keep-alive timeout (see `progress_server.serve`).

The bucket is written here rather than taken from a rate-limit library: the ones on PyPI
(aiolimiter, limits) wait for capacity or need a storage backend, and the server must refuse
at once, per client, with a bounded table of clients (a `cachetools.TTLCache`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from cachetools import TTLCache


def client_of(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return peer[0] if isinstance(peer, tuple) and peer else str(peer)


@dataclass
class ConnectionLimiter:
    max_connections: int
    max_per_client: int
    open: Counter = field(default_factory=Counter)
    refused: int = 0

    @property
    def total(self) -> int:
        return sum(self.open.values())

    def admit(self, client: str) -> bool:
        if self.total >= self.max_connections or self.open[client] >= self.max_per_client:
            self.refused += 1
            return False
        self.open[client] += 1
        return True

    def release(self, client: str) -> None:
        self.open[client] -= 1
        if self.open[client] <= 0:
            del self.open[client]

    def protocol_factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """Wrap an asyncio protocol factory (an HTTP server's) so connections over the caps are
        closed before the inner protocol exists."""
        return lambda: _Limited(self, inner)


class _Limited(asyncio.Protocol):
    """Forwards every protocol callback to the server's own protocol, once admitted."""

    def __init__(self, limiter: ConnectionLimiter, inner: Callable[[], asyncio.Protocol]) -> None:
        self.limiter, self.make_inner = limiter, inner
        self.inner: asyncio.Protocol | None = None
        self.client = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client = client_of(transport)
        if not self.limiter.admit(self.client):
            transport.abort()
            return
        self.inner = self.make_inner()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.inner:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner else None

    def pause_writing(self) -> None:
        if self.inner:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner:
            self.limiter.release(self.client)
            self.inner.connection_lost(exc)
            self.inner = None


@dataclass
class TokenBucket:
    """`rate` events a second on average, `burst` at once."""

    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self) -> bool:
        now = self.clock()
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class ClientBuckets:
    """One bucket per client address, for at most `max_clients` recently seen clients (the oldest
    are forgotten: a forgotten client starts again with a full burst, which is the safe side)."""

    def __init__(self, rate: float, burst: float, max_clients: int = 4096) -> None:
        self.rate, self.burst = rate, burst
        self.buckets: TTLCache[str, TokenBucket] = TTLCache(maxsize=max_clients, ttl=max(60.0, burst / rate))

    def take(self, client: str) -> bool:
        bucket = self.buckets.get(client)
        if bucket is None:
            bucket = self.buckets[client] = TokenBucket(self.rate, self.burst)
        return bucket.take()


class ThrottledLog:
    """At most one line per reason per `interval` seconds; the lines in between are counted."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.logger, self.interval, self.clock = logger, interval, clock
        self.last: dict[str, float] = {}
        self.suppressed: Counter = Counter()

    def warning(self, reason: str, message: str, *args) -> None:
        now = self.clock()
        if reason in self.last and now - self.last[reason] < self.interval:
            self.suppressed[reason] += 1
            return
        if len(self.last) > 256:  # reasons are a fixed set; this only bounds a misuse
            self.last.clear()
        skipped = self.suppressed.pop(reason, 0)
        self.last[reason] = now
        suffix = f" ({skipped} more like it since the last line)" if skipped else ""
        self.logger.warning(message + suffix, *args)
