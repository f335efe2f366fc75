"""The poll loop every REST feed shares: a feed fetches one page from a cursor; the core does the rest.

A **feed** is an ``[[inbound]]`` whose adapter subclasses :class:`Feed` and implements one method,
``fetch(cursor) -> Page``: one request (or one poll) from the checkpointed cursor, returning the
items found, the cursor that follows them and whether more pages are waiting. The :class:`Poller`
here does everything else, once for every feed:

- **one poll in flight per feed across all instances**: a poll runs under the feed's fenced
  :class:`~bridge.lease.Lease` (``feed:<name>``), taken for the poll and released after it;
- **schedule**: the next poll time lives in Redis (``…:status`` ``next_poll``), so every instance
  agrees on it: ``interval`` seconds after a success, with ``jitter``; after an error an exponential
  back-off from ``backoff_base`` to ``backoff_max`` (jittered), or exactly the server's Retry-After;
- **checkpoint after publish**: a page's items are published (in order, each deduplicated by its
  item id through the bus's publish dedupe) and only then is the page's cursor written, with
  :meth:`Lease.guarded_set`, so an old holder that was paused cannot move the cursor back. A crash
  between the two re-fetches that page; the dedupe drops what was already published: no gap, no
  duplicate;
- **errors**: :class:`TransientFeedError` (and network errors, timeouts, Redis down) back off and
  retry; :class:`PermanentFeedError` stops the feed on this instance with its message: ``/readyz``
  reports it and ``wechat-bridge status`` shows it, until the daemon restarts (after the fix);
- **status** in Redis for ``wechat-bridge status`` (cursor, last success, last error, next poll,
  totals) and per-process counters for ``/metrics``;
- a one-off ``wechat-bridge poll NAME`` (:func:`poll_once`) that prints what a poll finds; it
  publishes and commits only with ``--publish``.

Keys (``P`` the prefix), all under the lease's hash tag, so the guarded write is one slot:
``P:{lease:feed:<name>}`` the lease, ``…:cursor`` the checkpoint (an opaque string the feed
defines), ``…:status`` a hash.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import json
import random
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import aiohttp
import msgspec
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from bridge import logging as blog
from bridge.adapter import Context, Registry, Source
from bridge.bus import UNAVAILABLE, Bus, Keys, connect
from bridge.config import Config
from bridge.envelope import Attachment, Conversation, Sender, make_envelope, stable_id
from bridge.errors import BusUnavailable
from bridge.lease import Lease
from bridge.transport import read_at_most

log = blog.get("feed")


class FeedError(Exception):
    """Base of the errors a feed's ``fetch`` raises. The message is shown in logs, ``status`` and
    ``/readyz``: make it say what to fix, and never put a secret (a key, a signature, a URL carrying
    one) in it."""


class TransientFeedError(FeedError):
    """Try again later: after ``retry_after`` seconds when the server said so, else after back-off."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentFeedError(FeedError):
    """Retrying cannot help (a rejected key, no credits, a body of unknown shape): the feed stops."""


class FeedOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The keys every feed takes (besides ``name`` and ``type``); a feed's options subclass this."""

    #: seconds between successful polls
    interval: float = 300.0
    #: each wait is ``interval`` × (1 ± jitter): instances and feeds do not poll in lock-step
    jitter: float = 0.1
    #: the API's origin (tests and private deployments point elsewhere); each feed gives its default
    base_url: str = ""
    #: back-off after an error: base × 2^(n-1) up to max, jittered; a Retry-After wins
    backoff_base: float = 5.0
    backoff_max: float = 900.0
    #: seconds one HTTP request may take
    timeout: float = 30.0
    #: seconds the poll lease lasts without renewal (renewed every third of it while polling)
    lease_ttl: float = 30.0
    #: seconds an item id is remembered by the publish dedupe
    dedupe_ttl: int = 30 * 86_400
    #: pages one poll follows at most (a guard against an API that never says "end")
    max_pages: int = 1000
    #: bytes one response body may have (a larger one is an error, retried with back-off)
    max_response: int = 8 * 1024 * 1024

    def check(self) -> None:
        if self.interval <= 0:
            raise ValueError("interval: must be more than 0 seconds")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter: must be at least 0 and less than 1")
        if not self.base_url.startswith(("https://", "http://")):
            raise ValueError("base_url: expected an http:// or https:// URL")
        if self.backoff_base <= 0 or self.backoff_max < self.backoff_base:
            raise ValueError("backoff_base: must be more than 0 and at most backoff_max")
        if self.timeout <= 0:
            raise ValueError("timeout: must be more than 0 seconds")
        if self.lease_ttl <= 0.3:
            raise ValueError("lease_ttl: must be more than 0.3 seconds")
        if self.dedupe_ttl < 1 or self.max_pages < 1:
            raise ValueError("dedupe_ttl: must be at least 1 (and max_pages at least 1)")
        if self.max_response < 1024:
            raise ValueError("max_response: at least 1024 bytes")


@dataclass(frozen=True)
class FeedItem:
    """One thing a feed found: it becomes one envelope, deduplicated by ``id``."""

    id: str
    conversation: Conversation
    text: str
    raw: Any
    created_at: float | None = None
    sender: Sender | None = None
    attachments: tuple[Attachment, ...] = ()
    kind: str = "message"
    event: str | None = None


@dataclass
class Page:
    """What one ``fetch`` found: ``items`` in the order to publish, the ``cursor`` to checkpoint once
    they are published (None: unchanged), and whether the next page should be fetched at once."""

    items: list[FeedItem]
    cursor: str | None
    more: bool = False


class Feed(Source):
    """A polled source. Subclasses set ``Options`` (a :class:`FeedOptions`) and implement ``fetch``."""

    Options: ClassVar[type[msgspec.Struct]] = FeedOptions
    options: FeedOptions
    long_running: ClassVar[bool] = True

    def __init__(self, name: str, options: Any, ctx: Context) -> None:
        super().__init__(name, options, ctx)
        self.poller = Poller(self, ctx.redis, ctx.bus.keys, ctx.instance)

    async def fetch(self, cursor: str | None) -> Page:
        """One request from ``cursor`` (None: never polled). Raise TransientFeedError or
        PermanentFeedError; anything else counts as transient and is logged with its traceback."""
        raise NotImplementedError

    def describe(self, cursor: str | None) -> str:
        """The cursor as a person reads it (``status``); by default the cursor itself."""
        return cursor or ""

    async def run(self) -> None:
        await self.poller.run()

    def stop(self) -> None:
        self.poller.stop()

    async def ready(self) -> str | None:
        return f"stopped: {self.poller.stopped}" if self.poller.stopped else None


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """An HTTP ``Retry-After`` (delta seconds or an HTTP date) as seconds from now; None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


async def read_body(response: aiohttp.ClientResponse, cap: int) -> bytes:
    """A response's body, at most ``cap`` bytes (the request's timeout bounds the time); a larger
    one raises TransientFeedError without reading the rest."""
    declared = response.content_length
    if declared is not None and declared > cap:
        raise TransientFeedError(f"response body of {declared} bytes is over max_response ({cap})")
    data = await read_at_most(response.content, cap + 1)
    if len(data) > cap:
        raise TransientFeedError(f"response body is over max_response ({cap} bytes)")
    return data


class LeaseLost(Exception):
    """The feed's lease moved on while we polled: stop without committing anything."""


class _Stopping(Exception):
    """The poller was asked to stop during a fetch."""


@dataclass
class FeedCounters:
    polls: int = 0
    items: int = 0
    duplicates: int = 0
    errors: int = 0
    by_error: dict[str, int] = field(default_factory=dict)


class Poller:
    """Runs one feed: schedule, lease, fetch, publish, checkpoint, back-off, status."""

    def __init__(self, feed: Feed, redis: Any, keys: Keys, instance: str) -> None:
        self.feed = feed
        self.redis = redis
        self.name = feed.name
        base = keys.lease(f"feed:{feed.name}")
        self.cursor_key = f"{base}:cursor"
        self.status_key = f"{base}:status"
        self.owner = f"{instance}:{uuid.uuid4().hex[:8]}"
        self.lease = Lease(redis, keys, f"feed:{feed.name}", self.owner, ttl=feed.options.lease_ttl)
        #: why the feed stopped (a permanent error), else None
        self.stopped: str | None = None
        self.counters = FeedCounters()
        #: the last error of a one-off dry run (the daemon's go to the status hash)
        self.last_error: str | None = None
        self._stop = asyncio.Event()
        self.log = blog.get("feed", feed=feed.name)

    @property
    def opts(self) -> FeedOptions:
        return self.feed.options

    def stop(self) -> None:
        self._stop.set()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), max(seconds, 0.0))

    # -- the loop -----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Poll whenever due and the lease is free, until stopped or a permanent error."""
        retry = min(self.opts.interval / 2, 1.0)
        while not self._stop.is_set() and self.stopped is None:
            try:
                due = await self._due_in()
                if due > 0:
                    await self._sleep(due)
                    continue
                if not await self.lease.acquire():
                    await self._sleep(retry)  # another instance polls now; it will reschedule
                    continue
                try:
                    if await self._due_in() <= 0:  # it may have polled just before we took the lease
                        await self.poll(publish=True)
                finally:
                    await self.lease.release()
            except UNAVAILABLE as e:
                self.log.warning("feed.redis_unavailable", error=type(e).__name__)
                await self._sleep(self.opts.backoff_base)
        if self.stopped is not None:
            await self._stop.wait()  # stay stopped (readiness false) until the daemon stops

    async def _due_in(self) -> float:
        raw = await self.redis.hget(self.status_key, "next_poll")
        if raw is None:
            return 0.0
        return float(raw) - time.time()

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(self.lease.ttl / 3)
            try:
                if not await self.lease.renew():
                    return
            except UNAVAILABLE:
                if not self.lease.held:
                    return

    async def poll(
        self, *, publish: bool, on_item: Callable[[FeedItem, bool], None] | None = None, max_pages: int = 0
    ) -> int:
        """One poll under the lease (the caller holds it): fetch pages from the checkpoint, publish
        and commit each (``publish``), or only report them (``on_item``: nothing is written then).
        Errors are recorded and scheduled, never raised; a lost lease or a stop ends the poll with
        nothing more committed. Returns how many items were found."""
        fence = self.lease.fence
        keeper = asyncio.create_task(self._keep_lease())
        found = 0
        pages = 0
        limit = max_pages or self.opts.max_pages
        started = time.time()
        try:
            raw = await self.redis.get(self.cursor_key)
            cursor = raw.decode() if raw is not None else None
            while True:
                page = await self._unless_stopped(self.feed.fetch(cursor))
                pages += 1
                for item in page.items:
                    stored = await self._publish(item) if publish else True
                    found += 1
                    if on_item is not None:
                        on_item(item, stored)
                if publish:
                    if not self.lease.held or self.lease.fence != fence:
                        raise LeaseLost
                    moved = page.cursor is not None and page.cursor != cursor
                    if moved and not await self.lease.guarded_set(self.cursor_key, str(page.cursor)):
                        raise LeaseLost
                if page.cursor is not None:
                    cursor = page.cursor
                if not page.more or pages >= limit or self._stop.is_set():
                    break
            self.counters.polls += 1
            if publish:
                await self._succeeded(cursor, found, pages, started)
            return found
        except LeaseLost:
            self.log.warning("feed.lease_lost", hint="another instance took the feed; nothing committed")
            return found
        except _Stopping:  # the daemon stops: the fetch in flight is dropped, nothing was committed
            return found
        except PermanentFeedError as e:
            await self._failed(str(e), permanent=True, record=publish)
            return found
        except TransientFeedError as e:
            await self._failed(str(e), retry_after=e.retry_after, record=publish)
            return found
        except (aiohttp.ClientError, TimeoutError) as e:
            await self._failed(f"network error: {type(e).__name__}", record=publish)
            return found
        except (BusUnavailable, *UNAVAILABLE) as e:
            await self._failed(f"redis unavailable: {type(e).__name__}", record=publish)
            return found
        except Exception as e:  # a bug or an unexpected body: back off and retry, with the traceback
            self.log.exception("feed.fetch_crashed")
            await self._failed(f"unexpected {type(e).__name__}: {e}", record=publish)
            return found
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)

    async def _unless_stopped(self, fetch: Coroutine[Any, Any, Page]) -> Page:
        """``fetch``, abandoned when the poller is asked to stop (nothing of it is committed yet)."""
        task = asyncio.ensure_future(fetch)
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise _Stopping

    async def _publish(self, item: FeedItem) -> bool:
        env = make_envelope(
            self.name,
            item.conversation,
            item.text,
            id=stable_id(self.name, item.id),
            sender=item.sender,
            attachments=list(item.attachments),
            kind=item.kind,
            event=item.event,
            raw=item.raw,
            **({"created_at": item.created_at} if item.created_at else {}),
        )
        stored = await self.feed.ctx.publish(env, dedupe_key=item.id, dedupe_ttl=self.opts.dedupe_ttl)
        if stored:
            self.counters.items += 1
        else:
            self.counters.duplicates += 1
        return stored

    def _jittered(self, seconds: float) -> float:
        j = self.opts.jitter
        return seconds * (1 + random.uniform(-j, j)) if j else seconds

    async def _succeeded(self, cursor: str | None, found: int, pages: int, started: float) -> None:
        now = time.time()
        nxt = now + self._jittered(self.opts.interval)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            self.status_key,
            mapping={
                "cursor": self.feed.describe(cursor),
                "last_success": f"{now:.3f}",
                "last_poll_items": found,
                "last_poll_pages": pages,
                "next_poll": f"{nxt:.3f}",
                "consecutive_errors": 0,
                "owner": self.owner,
            },
        )
        pipe.hdel(self.status_key, "stopped")
        pipe.hincrby(self.status_key, "polls_total", 1)
        pipe.hincrby(self.status_key, "items_total", found)
        await pipe.execute()
        self.log.info("feed.polled", items=found, pages=pages, took=round(now - started, 3))

    async def _failed(
        self, message: str, *, permanent: bool = False, retry_after: float | None = None, record: bool = True
    ) -> None:
        self.counters.errors += 1
        kind = "permanent" if permanent else "transient"
        self.counters.by_error[kind] = self.counters.by_error.get(kind, 0) + 1
        if not record:  # a one-off dry run: report, change nothing
            if permanent:
                self.stopped = message
            self.last_error = message
            return
        now = time.time()
        try:
            n = int(await self.redis.hincrby(self.status_key, "consecutive_errors", 1))
            if permanent:
                delay = 0.0
            elif retry_after is not None:
                delay = min(max(retry_after, 0.0), 86_400.0)
            else:
                delay = self._jittered(min(self.opts.backoff_base * 2 ** (n - 1), self.opts.backoff_max))
            mapping: dict[str, Any] = {"last_error": message, "last_error_at": f"{now:.3f}"}
            if permanent:
                mapping["stopped"] = message
            else:
                mapping["next_poll"] = f"{now + delay:.3f}"
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(self.status_key, mapping=mapping)
            pipe.hincrby(self.status_key, "errors_total", 1)
            await pipe.execute()
            if permanent:
                self.stopped = message
        except UNAVAILABLE:
            n, delay = 0, self.opts.backoff_base
            if permanent:
                self.stopped = message
            else:  # cannot record the schedule: wait here instead
                await self._sleep(delay)
        if permanent:
            self.log.error("feed.stopped", reason=message)
        else:
            self.log.warning("feed.error", error=message, retry_in=round(delay, 3), attempt=n)


# -- status, metrics ------------------------------------------------------------------------------


def is_feed(cls: type[Any]) -> bool:
    return isinstance(cls, type) and issubclass(cls, Feed)


async def feed_status(redis: Any, keys: Keys, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Per feed: cursor, last success, last error, next poll, totals, stopped (from Redis)."""
    out: dict[str, dict[str, Any]] = {}
    now = time.time()
    for name in names:
        base = keys.lease(f"feed:{name}")
        raw = await redis.hgetall(f"{base}:status")
        st = {k.decode(): v.decode() for k, v in raw.items()}
        row: dict[str, Any] = {"cursor": st.get("cursor")}
        for key in ("last_success", "last_error_at", "next_poll"):
            if key in st:
                t = float(st[key])
                row[key] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
                if key == "next_poll":
                    row["next_poll_in"] = round(t - now, 1)
        row["last_error"] = st.get("last_error")
        if "stopped" in st:
            row["stopped"] = st["stopped"]
        for key in ("polls_total", "items_total", "errors_total", "consecutive_errors"):
            row[key] = int(st.get(key, 0))
        holder = await redis.get(base)
        row["polling_now"] = holder.decode().rsplit("|", 1)[0] if holder else None
        out[name] = row
    return out


def feed_table(feeds: dict[str, dict[str, Any]]) -> str:
    """``status``'s feeds section for a terminal: one line per feed."""
    cols = ("feed", "cursor", "last_success", "next_poll_in", "polls", "items", "errors", "state")
    rows = [cols]
    for name, f in feeds.items():
        state = f"stopped: {f['stopped']}" if f.get("stopped") else (f.get("last_error") or "ok")
        rows.append((
            name, str(f.get("cursor") or "-"), str(f.get("last_success") or "-"),
            str(f.get("next_poll_in", "-")), str(f["polls_total"]), str(f["items_total"]),
            str(f["errors_total"]), state,
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols) - 1)]
    lines = ["feeds"] + [
        "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows
    ]
    return "\n".join(lines)


class FeedCollector(Collector):
    """The feeds' families for /metrics (a collector on the daemon's registry, read at each scrape):
    polls, items, duplicates and errors per feed, and whether a feed is stopped."""

    def __init__(self, sources: Callable[[], Iterable[tuple[str, Any]]]) -> None:
        self._sources = sources

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        feeds = [(n, s) for n, s in self._sources() if isinstance(s, Feed)]
        if not feeds:
            return
        polls = CounterMetricFamily("wechat_bridge_feed_polls", "Polls a feed finished", labels=["feed"])
        items = CounterMetricFamily("wechat_bridge_feed_items", "Items a feed published", labels=["feed"])
        dups = CounterMetricFamily(
            "wechat_bridge_feed_duplicates", "Items a feed found already published", labels=["feed"]
        )
        errors = CounterMetricFamily(
            "wechat_bridge_feed_errors", "Polls that failed, by kind", labels=["feed", "kind"]
        )
        stopped = GaugeMetricFamily(
            "wechat_bridge_feed_stopped", "1 when a permanent error stopped the feed", labels=["feed"]
        )
        for name, f in feeds:
            c = f.poller.counters
            polls.add_metric([name], c.polls)
            items.add_metric([name], c.items)
            dups.add_metric([name], c.duplicates)
            for kind in ("transient", "permanent"):
                errors.add_metric([name, kind], c.by_error.get(kind, 0))
            stopped.add_metric([name], int(f.poller.stopped is not None))
        yield from (polls, items, dups, errors, stopped)


# -- wechat-bridge poll NAME ----------------------------------------------------------------------


def configure_poll(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the [[inbound]] feed to poll")
    p.add_argument(
        "--publish",
        action="store_true",
        help="publish what is found and commit the cursor, as the daemon would (default: only print)",
    )
    p.add_argument(
        "--pages", type=int, default=0, help="follow at most this many pages (default: the feed's max_pages)"
    )
    p.add_argument("--wait", type=float, default=10.0, help="seconds to wait for a poll in flight elsewhere")


async def poll_once(cfg: Config, args: argparse.Namespace, registry: Registry, redis_url: str) -> int:
    """A one-off poll of one feed under its lease. Prints one JSON line per item and a summary.

    Without ``--publish`` nothing changes: nothing is published, the cursor stays, no status is
    written (the daemon's next poll sees the same items). With ``--publish`` it is one of the
    daemon's polls: items are published (deduplicated), the cursor committed, the status updated.
    """
    inbound = cfg.inbound_by_name(args.name)
    feeds = [i.name for i in cfg.inbound if is_feed(registry.source(i.type, f"inbound.{i.name}", cfg.path))]
    if inbound is None or inbound.name not in feeds:
        print(f"error: no feed named {args.name!r} in {cfg.path} (feeds: {', '.join(feeds) or 'none'})",
              file=sys.stderr)  # fmt: skip
        return 1
    options = registry.validate(cfg)
    redis = connect(redis_url, 10.0)
    session: aiohttp.ClientSession | None = None

    def http() -> aiohttp.ClientSession:
        nonlocal session
        if session is None:
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        return session

    try:
        bus = Bus(
            redis, Keys(cfg.redis.prefix), maxlen=cfg.redis.stream_maxlen, dedupe_ttl=cfg.redis.dedupe_ttl
        )
        ctx = Context(config=cfg, bus=bus, redis=redis, instance=f"{cfg.bridge.instance}-cli",
                      data_dir=cfg.data_dir, http=http)  # fmt: skip
        cls = registry.source(inbound.type, f"inbound.{inbound.name}", cfg.path)
        feed = cls(inbound.name, options[inbound.name], ctx)
        assert isinstance(feed, Feed)
        poller = feed.poller
        await feed.start()
        end = time.monotonic() + args.wait
        while not await poller.lease.acquire():
            if time.monotonic() > end:
                print(
                    f"error: feed {args.name!r} is being polled by another instance; try again",
                    file=sys.stderr,
                )
                return 1
            await asyncio.sleep(0.2)
        before = await redis.get(poller.cursor_key)

        def show(item: FeedItem, stored: bool) -> None:
            row = {"id": item.id, "conversation": item.conversation.id, "text": item.text,
                   "created_at": item.created_at}  # fmt: skip
            if args.publish:
                row["published"] = stored
            print(json.dumps(row, ensure_ascii=False))

        try:
            found = await poller.poll(publish=args.publish, on_item=show, max_pages=args.pages)
        finally:
            await poller.lease.release()
            await feed.close()
        after = await redis.get(poller.cursor_key)
        summary = {
            "feed": args.name,
            "items": found,
            "published": args.publish,
            "cursor_before": feed.describe(before.decode() if before else None),
            "cursor_after": feed.describe(after.decode() if after else None),
            "error": poller.stopped or (None if args.publish else poller.last_error),
        }
        if args.publish:
            st = await redis.hgetall(poller.status_key)
            summary["error"] = poller.stopped or (
                st.get(b"last_error", b"").decode() if st.get(b"consecutive_errors", b"0") != b"0" else None
            )
        print(json.dumps(summary, ensure_ascii=False), file=sys.stderr)
        return 1 if summary["error"] else 0
    finally:
        if session is not None:
            await session.close()
        await redis.aclose()
