"""A connection only one instance may hold, usable from every instance.

Some platforms allow one live connection per account (the WeCom AI bot's WebSocket, a Wechaty
puppet): one instance holds it, but deliveries for it are read by whichever instance's runner gets
them. :class:`HeldConnection` joins the two. It keeps a fenced lease ``held:<name>``
(:mod:`bridge.lease`); the adapter connects only while ``lease.held``. Anyone calls
``await call(op, payload, request_id=..., timeout=...)``:

* in the holder, ``handler(op, payload)`` runs here;
* elsewhere, the request is appended to ``P:{held:<name>}:req`` and the caller waits (BLPOP) for the
  answer on ``P:{held:<name>}:ans:<request id>``; the holder's serve loop pops requests and runs them.
  No answer within ``timeout`` raises :class:`RetryableError`, so the runner retries later with the
  same request id.

**At most once per request id.** Every run's result (success or :class:`PermanentError`) is written
to ``P:{held:<name>}:done:<request id>`` (``done_ttl``) before the answer is pushed
(``lua/held_finish.lua``, one script). A request whose id has a record is answered from it without
running again, by the requester itself (``lua/held_request.lua`` checks before queueing) or by the
holder; a request id already running in this process waits for that run. A :class:`RetryableError`
(or any other exception) is answered but not recorded: a retry runs it again. Sinks derive the
request id from the delivery id (and part number), so a retried delivery never sends twice.

**A popped request is not moved to a processing list** to be requeued when its holder dies. Instead
the requester's retry, with the same request id, is the recovery: a holder that dies mid-request
leaves no record, the requester times out, the runner retries, the next holder runs it. A
processing list would do worse: the holder that takes over would run requests whose requesters had
already given up and retried or dead-lettered them — stale sends, possibly after a newer delivery
of the same conversation — while the requester stays the one that knows whether the work is still
wanted and in which order. Entries carry the requester's deadline; the holder drops expired ones
unrun (their requester has stopped waiting and will retry). The one window no scheme closes: a
holder killed after the platform took a send and before the record is written; the retry then sends
again. It is as narrow as one Redis round trip.

A popped request the holder cannot serve because its lease is gone is pushed back to the head for
the next holder. Order per conversation holds because the runner sends one delivery of a
conversation at a time and waits for its answer; the holder runs requests concurrently (at most
``concurrency`` at once).

Keys (``P`` the prefix; one hash tag, so each script's keys share a slot)::

    P:{held:<name>}:req               list of requests (JSON: id, op, payload, ans, deadline)
    P:{held:<name>}:ans:<request id>  list with the one answer, short TTL
    P:{held:<name>}:done:<request id> the recorded answer of a request id that ran, ``done_ttl``
    P:{lease:held:<name>}             the lease (bridge.lease)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import msgspec

from bridge import logging as blog
from bridge.bus import UNAVAILABLE, Keys
from bridge.errors import PermanentError, RetryableError
from bridge.lease import Lease
from bridge.lua import source

#: runs one request in the holder: returns a JSON-able dict, raises PermanentError/RetryableError
Handler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]

#: the request list expires this long after the last push (nobody held the connection meanwhile)
REQUEST_LIST_TTL = 3600
#: an answer waits this long for its requester beyond the request's own deadline
ANSWER_TTL = 60


class _Relayed(msgspec.Struct, frozen=True):
    id: str
    op: str
    payload: dict[str, Any]
    ans: str
    deadline: float


class _RelayAnswer(msgspec.Struct, frozen=True, omit_defaults=True):
    ok: bool
    result: dict[str, Any] = {}
    error: Literal["", "permanent", "retryable"] = ""
    message: str = ""
    retry_after: float | None = None


_relayed_decoder = msgspec.json.Decoder(_Relayed)
_answer_decoder = msgspec.json.Decoder(_RelayAnswer)


class HeldConnection:
    """One named connection: the lease that says who holds it, and the relay to the holder."""

    def __init__(
        self,
        redis: Any,
        keys: Keys,
        name: str,
        owner: str,
        *,
        ttl: float,
        handler: Handler,
        retry: float | None = None,
        done_ttl: int = 86_400,
        concurrency: int = 32,
        poll: float = 1.0,
    ) -> None:
        """``ttl``: the lease's; a dead holder is replaced within ``ttl + retry`` (``retry``
        defaults to ``ttl/3``). ``poll``: the longest single blocking read (below the Redis
        client's socket timeout)."""
        if done_ttl < 1:
            raise ValueError("done_ttl must be at least 1 s")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.redis = redis
        self.name = name
        self.lease = Lease(redis, keys, f"held:{name}", owner, ttl=ttl)
        self.handler = handler
        self.retry = retry
        self.done_ttl = done_ttl
        self.poll = max(0.01, min(poll, ttl / 3))
        self._base = f"{keys.prefix}:{{held:{name}}}"
        self.request_key = f"{self._base}:req"
        self._request = redis.register_script(source("held_request"))
        self._finish = redis.register_script(source("held_finish"))
        self._running: dict[str, asyncio.Future[bytes]] = {}
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self.log = blog.get("held", held=name)

    def answer_key(self, request_id: str) -> str:
        return f"{self._base}:ans:{request_id}"

    def done_key(self, request_id: str) -> str:
        return f"{self._base}:done:{request_id}"

    @property
    def held(self) -> bool:
        return self.lease.held

    async def wait_held(self) -> None:
        await self.lease.wait_held()

    async def wait_lost(self) -> None:
        await self.lease.wait_lost()

    async def run(self, stop: asyncio.Event, *, drained: Callable[[], Awaitable[None]] | None = None) -> None:
        """Keep the lease whenever possible and, while held, serve relayed requests; until ``stop``.

        At stop, requests being served finish first (bounded by the lease's ttl), then ``drained``
        runs (the holder closes its connection there), then the lease is released — in that order,
        so the next holder never connects while this one is still sending."""
        lease_stop = asyncio.Event()
        keeper = asyncio.create_task(self.lease.run(lease_stop, retry=self.retry))
        serve = asyncio.create_task(self._serve(stop))
        try:
            await stop.wait()
        finally:
            serve.cancel()
            await asyncio.gather(serve, return_exceptions=True)
            if self._tasks:  # requests being served finish (their sends must not be cut midway)
                await asyncio.wait(self._tasks, timeout=max(self.lease.ttl, 1.0))
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if drained is not None:
                try:
                    await drained()
                except Exception:
                    self.log.exception("held.drained_failed")
            lease_stop.set()
            await asyncio.gather(keeper, return_exceptions=True)

    async def call(
        self, op: str, payload: dict[str, Any], *, request_id: str, timeout: float
    ) -> dict[str, Any]:
        """Run ``op`` where the connection is held; at most once per ``request_id``.

        Raises the handler's :class:`PermanentError` / :class:`RetryableError`, and
        :class:`RetryableError` when no holder answered within ``timeout`` seconds."""
        if not request_id:
            raise ValueError("call: request_id must not be empty")
        if self.lease.held:
            try:
                return _unwrap(await self._execute(request_id, op, payload))
            except UNAVAILABLE as e:  # the record could not be read or written: try again later
                raise RetryableError(
                    f"held connection {self.name}: Redis unavailable ({type(e).__name__})"
                ) from None
        deadline = time.time() + timeout
        entry = msgspec.json.encode(_Relayed(request_id, op, payload, self.answer_key(request_id), deadline))
        try:
            done = await self._request(
                keys=[self.request_key, self.done_key(request_id)], args=[entry, REQUEST_LIST_TTL * 1000]
            )
            if done is not None:
                return _unwrap(done)
            while (left := deadline - time.time()) > 0:
                popped = await self.redis.blpop([self.answer_key(request_id)], timeout=min(left, self.poll))
                if popped is not None:
                    return _unwrap(popped[1])
        except UNAVAILABLE as e:
            raise RetryableError(
                f"held connection {self.name}: Redis unavailable ({type(e).__name__})"
            ) from None
        self.log.info("held.no_answer", request=request_id, op=op)
        raise RetryableError(f"held connection {self.name}: no answer from its holder within {timeout:g} s")

    async def _execute(self, request_id: str, op: str, payload: dict[str, Any]) -> bytes:
        """Run a request here, once per id: its answer (JSON), recorded when final."""
        running = self._running.get(request_id)
        if running is not None:  # the same id is running here: share its answer
            return await asyncio.shield(running)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._running[request_id] = fut
        try:
            recorded = await self.redis.get(self.done_key(request_id))
            if recorded is not None:
                answer = bytes(recorded)
            else:
                answer = await self._run_handler(request_id, op, payload)
                final = _answer_decoder.decode(answer).error != "retryable"
                key = self.done_key(request_id)
                if final and not await self.redis.set(key, answer, px=self.done_ttl * 1000, nx=True):
                    answer = bytes(await self.redis.get(key) or answer)
            fut.set_result(answer)
            return answer
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        finally:
            self._running.pop(request_id, None)

    async def _run_handler(self, request_id: str, op: str, payload: dict[str, Any]) -> bytes:
        try:
            result = await self.handler(op, payload)
            return msgspec.json.encode(_RelayAnswer(ok=True, result=result))
        except PermanentError as e:
            return msgspec.json.encode(_RelayAnswer(ok=False, error="permanent", message=str(e)))
        except RetryableError as e:
            return msgspec.json.encode(
                _RelayAnswer(ok=False, error="retryable", message=str(e), retry_after=e.retry_after)
            )
        except Exception as e:  # a bug or an unexpected failure: retryable, never recorded
            self.log.exception("held.handler_failed", request=request_id, op=op)
            return msgspec.json.encode(
                _RelayAnswer(ok=False, error="retryable", message=f"{op} failed: {type(e).__name__}")
            )

    async def _serve(self, stop: asyncio.Event) -> None:
        """While the lease is held: pop requests and run each in its own task."""
        while not stop.is_set():
            await self.lease.wait_held()
            while self.lease.held and not stop.is_set():
                await self._slots.acquire()
                try:
                    popped = await self.redis.blpop([self.request_key], timeout=self.poll)
                except UNAVAILABLE as e:
                    self._slots.release()
                    self.log.warning("held.redis_unavailable", error=str(e))
                    await asyncio.sleep(self.poll)
                    continue
                except BaseException:
                    self._slots.release()
                    raise
                if popped is None:
                    self._slots.release()
                    continue
                raw = bytes(popped[1])
                if not self.lease.held:  # lost meanwhile: the next holder serves it
                    self._slots.release()
                    with contextlib.suppress(*UNAVAILABLE):
                        await self.redis.lpush(self.request_key, raw)
                    break
                task = asyncio.create_task(self._serve_one(raw))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _serve_one(self, raw: bytes) -> None:
        try:
            try:
                req = _relayed_decoder.decode(raw)
            except msgspec.DecodeError as e:
                self.log.error("held.bad_request", error=str(e))
                return
            if req.deadline < time.time():  # the requester stopped waiting; it retries with this id
                self.log.info("held.request_expired", request=req.id, op=req.op)
                return
            answer = await self._execute(req.id, req.op, req.payload)
            keep = 0 if _answer_decoder.decode(answer).error == "retryable" else self.done_ttl * 1000
            ans_ttl = int((max(req.deadline - time.time(), 0) + ANSWER_TTL) * 1000)
            # the answer key is derived from the id (same hash slot), not taken from the entry
            await self._finish(
                keys=[self.done_key(req.id), self.answer_key(req.id)], args=[answer, keep, ans_ttl]
            )
        except UNAVAILABLE as e:  # the requester times out and retries with the same id
            self.log.warning("held.redis_unavailable", error=str(e))
        finally:
            self._slots.release()


def _unwrap(raw: bytes) -> dict[str, Any]:
    answer = _answer_decoder.decode(raw)
    if answer.ok:
        return answer.result
    if answer.error == "permanent":
        raise PermanentError(answer.message)
    raise RetryableError(answer.message, answer.retry_after)
