"""AsyncEngine: many asyncio clients over one continuously batched LLMEngine.

Threading model. The engine is single-threaded by design (scheduler, block manager and sampler
state are plain Python), and a step is seconds of torch work that must not block the event
loop. So one dedicated thread owns the engine: it is the only caller of `add_request`, `abort`
and `step`. The event loop talks to it through a FIFO inbox of closures, and the thread hands
each step's outputs back with one `loop.call_soon_threadsafe` per step, which fans them out to
per-HTTP-request asyncio queues. The thread blocks on the inbox while the engine is idle and
steps continuously while anything is in flight, draining the inbox between steps, so a new
request joins the running batch at the next step.

Aborts. Every `RequestStream` is closed in a `finally` by its HTTP handler (or by the
streaming response when the client goes away); closing queues an abort of its unfinished
requests, which the engine thread runs before its next step, freeing their KV blocks.

Deadline. A stream submitted with a timeout raises RequestTimeoutError from its iteration once
that many seconds have passed since it was submitted; its handler then closes it, which aborts
it as above (504 for a waiting client, an error event for a stream).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from lamina.engine.llm_engine import LLMEngine
from lamina.outputs import RequestOutput
from lamina.sampling_params import SamplingParams

logger = logging.getLogger("lamina.server")
T = TypeVar("T")
_STOP = object()
_POLL_SECONDS = 0.2  # how often a non-streaming request checks that its client is still there


class EngineClosedError(RuntimeError):
    """The server is shutting down and takes no new requests."""


class EngineOverloadedError(RuntimeError):
    """Too many requests are already queued."""


class RequestTimeoutError(Exception):
    """The request ran past the server's per-request deadline (--request-timeout)."""


class ClientDisconnectedError(Exception):
    """The HTTP client went away while its request ran."""


class RequestObserver(Protocol):
    """Receives request timings from the engine thread (the Prometheus metrics)."""

    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def finished(self, seconds: float | None, reason: str) -> None: ...


@dataclass
class EngineSnapshot:
    """Engine gauges, written by the engine thread after every iteration, read by /metrics."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    generation_tokens: int = 0
    prompt_tokens_computed: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    spec_drafts: int = 0  # sequence-steps that verified guesses (speculative decoding)
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_accepted_at: tuple[int, ...] = ()  # kept guesses by position
    spec_proposed_at: tuple[int, ...] = ()  # guesses made by position


@dataclass
class _Route:
    """Where one engine request's outputs go (engine thread only)."""

    stream: RequestStream
    index: int
    arrival: float
    last_token_time: float | None = None
    num_tokens: int = 0


class RequestStream:
    """The engine requests of one HTTP request (one per prompt) and their outputs, in step
    order. Iterating yields (prompt index, cumulative RequestOutput); an output of None means
    the server aborted that request (shutdown or engine failure)."""

    def __init__(self, owner: AsyncEngine, ids: list[str], timeout: float | None = None) -> None:
        self._owner = owner
        self.ids = ids
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        # what iterating raises past the deadline (the server makes it an HTTP 504)
        self.timeout_error: Callable[[str], BaseException] = RequestTimeoutError
        self._queue: asyncio.Queue[tuple[int, RequestOutput | None] | BaseException]
        self._queue = asyncio.Queue()
        self._unfinished = set(range(len(ids)))
        self._poll: Callable[[], Awaitable[bool]] | None = None
        self._polled = time.monotonic()
        self.closed = False

    def watch(self, is_disconnected: Callable[[], Awaitable[bool]]) -> None:
        """Poll this while waiting, and stop with ClientDisconnectedError when it says so (for
        non-streaming responses, where nothing else notices a client leaving)."""
        self._poll = is_disconnected

    async def _get(self) -> tuple[int, RequestOutput | None] | BaseException:
        if self._poll is None and self.deadline is None:
            return await self._queue.get()
        while True:  # outputs may arrive every few ms: poll on a clock, not on a quiet queue
            now = time.monotonic()
            wait = _POLL_SECONDS
            if self._poll is not None and now - self._polled >= _POLL_SECONDS:
                self._polled = now
                if await self._poll():
                    raise ClientDisconnectedError()
            if self.deadline is not None:
                if now >= self.deadline:
                    raise self.timeout_error(
                        f"the request ran past this server's limit of {self.timeout:g} s "
                        "(--request-timeout) and was aborted"
                    )
                left = self.deadline - now
                wait = min(wait, left) if self._poll is not None else left
            try:
                return await asyncio.wait_for(self._queue.get(), timeout=wait)
            except asyncio.TimeoutError:
                continue

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput | None]]:
        while self._unfinished:
            item = await self._get()
            if isinstance(item, BaseException):
                raise item
            index, out = item
            if out is None or out.finished:
                self._unfinished.discard(index)
            yield index, out

    def close(self) -> None:
        """Abort whatever has not finished and free its blocks (idempotent)."""
        if not self.closed:
            self.closed = True
            self._owner._release(self, [self.ids[i] for i in self._unfinished])


class AsyncEngine:
    """Owns an LLMEngine on a dedicated thread; see the module docstring."""

    def __init__(
        self,
        engine: LLMEngine,
        observer: RequestObserver | None = None,
        max_pending_requests: int = 1024,
    ) -> None:
        self.engine = engine
        self.observer = observer
        self.max_pending_requests = max_pending_requests
        self.snapshot = EngineSnapshot(kv_blocks_total=engine.block_manager.num_blocks)
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._routes: dict[str, _Route] = {}
        self._open: set[RequestStream] = set()
        self._num_open = 0
        self._ids = itertools.count()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle (event loop) -----------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; outputs are delivered to the running event loop."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="lamina-engine", daemon=True)
        self._thread.start()

    @property
    def num_open_requests(self) -> int:
        return self._num_open

    async def drain(self, grace: float) -> None:
        """Refuse new requests, give running ones `grace` seconds to finish, then abort the
        rest so their streams end cleanly (finish_reason "abort")."""
        self._closing = True
        deadline = time.monotonic() + grace
        while self._open and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._open:
            await self.call(self._abort_all)
            deadline = time.monotonic() + 2.0
            while self._open and time.monotonic() < deadline:
                await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """Abort everything and end the engine thread."""
        self._closing = True
        if self._thread is None:
            return
        self._inbox.put(_STOP)
        await asyncio.to_thread(self._thread.join, 10.0)
        self._thread = None

    # ---- requests (event loop) ------------------------------------------------------------
    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between steps and return its result."""
        if self._thread is None:
            raise EngineClosedError("the engine is not running")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # handed to the awaiting coroutine
                    fut.set_exception(e)

        self._inbox.put(run)
        return await asyncio.wrap_future(fut)

    async def submit(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        timeout: float | None = None,
    ) -> RequestStream:
        """Queue one engine request per prompt. Raises ValueError (nothing is left queued) if
        the engine rejects any of them, EngineClosedError / EngineOverloadedError when it
        cannot take them. Iterating the stream raises RequestTimeoutError `timeout` seconds
        from now (None: never). The caller must close() the stream."""
        if self._closing or self._thread is None:
            raise EngineClosedError("the server is shutting down")
        if self._num_open + len(prompts) > self.max_pending_requests:
            raise EngineOverloadedError(
                f"{self._num_open} requests are in flight (limit {self.max_pending_requests})"
            )
        tag = next(self._ids)
        stream = RequestStream(self, [f"req-{tag}-{i}" for i in range(len(prompts))], timeout)
        self._open.add(stream)
        self._num_open += len(prompts)

        def add() -> None:
            now = time.monotonic()
            added: list[str] = []
            try:
                for i, (rid, ids, p) in enumerate(zip(stream.ids, prompts, params)):
                    self.engine.add_request(rid, ids, p)
                    added.append(rid)
                    self._routes[rid] = _Route(stream, i, now)
            except BaseException:
                for rid in added:
                    self._routes.pop(rid, None)
                self.engine.abort(added)
                raise

        try:
            await self.call(add)
        except BaseException:
            stream.close()
            raise
        return stream

    def _release(self, stream: RequestStream, unfinished: list[str]) -> None:
        if stream in self._open:
            self._open.discard(stream)
            self._num_open -= len(stream.ids)
        if unfinished:
            self._inbox.put(lambda: self._abort(unfinished))

    # ---- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                if not self._iterate():
                    return
            # the engine thread must never die with requests waiting on it
            except Exception:  # noqa: PERF203
                logger.exception("engine loop failed; aborting every request in flight")
                self._abort_all(error=RuntimeError("internal engine error"))

    def _iterate(self) -> bool:
        """Run queued commands, then one step if anything is in flight. False on stop."""
        busy = self.engine.has_unfinished_requests()
        try:
            cmd = self._inbox.get(block=not busy)
        except queue.Empty:
            cmd = None
        while cmd is not None:
            if cmd is _STOP:
                self._abort_all()
                return False
            try:
                cmd()
            except Exception:  # a command never takes the engine thread down
                logger.exception("engine command failed")
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                cmd = None
        if self.engine.has_unfinished_requests():
            self._step()
        self._take_snapshot()
        return True

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            logger.exception("engine step failed; aborting every request in flight")
            self._abort_all(error=e)
            return
        now = time.monotonic()
        batch: list[tuple[RequestStream, int, RequestOutput]] = []
        for out in outputs:
            route = self._routes.get(out.request_id)
            if route is None:
                continue
            n = sum(len(o.token_ids) for o in out.outputs)
            if n > route.num_tokens and self.observer is not None:
                if route.last_token_time is None:
                    self.observer.first_token(now - route.arrival)
                else:
                    self.observer.inter_token(now - route.last_token_time)
            if n > route.num_tokens:
                route.last_token_time, route.num_tokens = now, n
            if out.finished:
                del self._routes[out.request_id]
                if self.observer is not None:
                    reasons = [o.finish_reason or "abort" for o in out.outputs]
                    self.observer.finished(now - route.arrival, reasons[0] if reasons else "stop")
            batch.append((route.stream, route.index, out))
        if batch:
            self._deliver(batch)

    def _abort(self, ids: list[str]) -> None:
        for rid in ids:
            if self._routes.pop(rid, None) is not None and self.observer is not None:
                self.observer.finished(None, "abort")
        self.engine.abort(ids)

    def _abort_all(self, error: BaseException | None = None) -> None:
        """Abort every request; their streams get None (or the error) so they end."""
        routes = list(self._routes.items())
        self._routes.clear()
        self.engine.abort([rid for rid, _ in routes] + list(self.engine.requests))
        observer = self.observer
        if observer is not None:
            for _ in routes:
                observer.finished(None, "abort")
        if error is not None:
            failure = RuntimeError(f"the engine failed: {type(error).__name__}: {error}")
            streams = {id(r.stream): r.stream for _, r in routes}
            self._deliver([(s, -1, failure) for s in streams.values()])
        else:
            self._deliver([(r.stream, r.index, None) for _, r in routes])
        self._take_snapshot()

    def _deliver(self, batch: list[tuple[RequestStream, int, Any]]) -> None:
        def put() -> None:
            for stream, index, item in batch:
                stream._queue.put_nowait(item if index < 0 else (index, item))

        if self._loop is not None and not self._loop.is_closed():
            # the loop may close meanwhile: then nobody is waiting any more
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(put)

    def _take_snapshot(self) -> None:
        e = self.engine
        st = e.stats
        self.snapshot = EngineSnapshot(
            num_running=len({s.request_id for s in e.scheduler.running}),
            num_waiting=len({s.request_id for s in e.scheduler.waiting}),
            kv_blocks_used=e.block_manager.num_used_blocks,
            kv_blocks_total=e.block_manager.num_blocks,
            generation_tokens=st.generation_tokens,
            prompt_tokens_computed=st.prompt_tokens_computed,
            prefix_cache_queries=e.scheduler.stats.prefix_cache_queries,
            prefix_cache_hits=e.scheduler.stats.prefix_cache_hits,
            num_preemptions=e.scheduler.stats.num_preemptions,
            spec_drafts=st.spec.num_drafts,
            spec_draft_tokens=st.spec.num_draft_tokens,
            spec_accepted_tokens=st.spec.num_accepted_tokens,
            spec_accepted_at=tuple(st.spec.accepted_at),
            spec_proposed_at=tuple(st.spec.proposed_at),
        )
