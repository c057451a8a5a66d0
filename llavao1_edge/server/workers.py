"""The server's workers: the weights loaded once, one llama.cpp context per parallel request, and a bounded
queue in front of them. A search runs in a worker thread and hands its events to the event loop; a client
that leaves sets its search's cancel flag, and the context returns to the pool when the thread ends (the
search checks the flag at every token)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from ..engine import Engine, Weights
from ..options import SearchConfig
from ..search import search_events
from ..trace import Event
from .config import ServerConfig

_END = object()  # the end of a search's events


class Busy(Exception):
    """Every worker is searching and the queue is full."""


@dataclass
class Job:
    """One request, validated: what the search gets."""

    question: str
    image: object | None  # a decoded RGB PIL image, or None
    search: SearchConfig
    history: Sequence[tuple[str, str]] = ()  # earlier turns: (role, text)
    events: bool = False  # the client asked for the search's events (the llavao1 extension)
    options: dict = field(default_factory=dict)  # what the client asked for, for its own answer's format


class Workers:
    def __init__(self, cfg: ServerConfig):
        total = cfg.engine.n_threads or os.cpu_count() or 1
        self.weights = Weights(cfg.model, cfg.mmproj, replace(cfg.engine, n_threads=total))
        # n_seq_max bounds the candidates a request may ask for: each candidate and its judge prompt a sequence
        self.engine_config = replace(cfg.engine, n_threads=max(1, total // cfg.parallel),
                                     n_seq_max=max(16, 2 * cfg.search.candidates + 1))
        self.engines = []
        try:
            for _ in range(cfg.parallel):
                self.engines.append(Engine(config=self.engine_config, weights=self.weights))
        except BaseException:
            self.close()
            raise
        self.queue_limit = cfg.queue
        self.waiting = 0  # requests waiting for a worker
        self._free: asyncio.Queue | None = None
        self._executor = ThreadPoolExecutor(cfg.parallel, thread_name_prefix="llavao1-search")
        self._cancels: set[threading.Event] = set()

    @property
    def max_candidates(self) -> int:
        return (self.engine_config.n_seq_max - 1) // 2

    @property
    def n_ctx(self) -> int:
        return self.engine_config.n_ctx

    @property
    def has_vision(self) -> bool:
        return self.engines[0].has_vision

    @property
    def busy(self) -> int:
        return len(self.engines) - (self._free.qsize() if self._free else len(self.engines))

    async def start(self) -> None:
        """Called in the event loop before the first request."""
        self._free = asyncio.Queue()
        for e in self.engines:
            self._free.put_nowait(e)

    async def _acquire(self) -> Engine:
        if self._free.empty() and self.waiting >= self.queue_limit:
            raise Busy()
        self.waiting += 1
        try:
            return await self._free.get()
        finally:
            self.waiting -= 1

    async def run(self, job: Job, wanted: Callable[[Event], bool] = lambda ev: True) -> AsyncIterator[Event]:
        """The search's events as it runs (those `wanted`, then prompt_ready and done, which always come);
        closing this generator early (a client that left) cancels the search."""
        engine = await self._acquire()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        self._cancels.add(cancel)

        def put(item) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        def work() -> None:
            try:
                _check_fits(engine, job)
                for ev in search_events(engine, job.image, job.question, job.search, cancel, job.history):
                    if ev.kind in ("prompt_ready", "done") or wanted(ev):  # each hand-over wakes the event loop
                        put(ev)
            except BaseException as e:  # handed to the request, which answers with it
                put(e)
            finally:
                put(_END)

        def release(_) -> None:
            self._cancels.discard(cancel)
            self._free.put_nowait(engine)

        loop.run_in_executor(self._executor, work).add_done_callback(release)
        try:
            while (item := await events.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()  # nothing left to wait for; a search still running stops at its next token

    def cancel_all(self) -> None:
        """Stop every search (shutting down): each ends at its next token, its answer flagged 'cancelled'."""
        for c in list(self._cancels):
            c.set()

    def close(self) -> None:
        """Wait for the searches' threads, then free every context and the weights."""
        self.cancel_all()
        if hasattr(self, "_executor"):
            self._executor.shutdown(wait=True)
        for e in self.engines:
            e.close()
        self.weights.close()


def _check_fits(engine: Engine, job: Job) -> None:
    """A conversation that leaves no room in the context for an answer is the client's mistake (a 400)."""
    words = job.question + "".join(text for _, text in job.history)
    n = len(engine.tokenize(words))
    if n > engine.config.n_ctx // 2:
        raise ValueError(f"the question and the conversation before it are {n} tokens; the server's context holds "
                         f"{engine.config.n_ctx} (--ctx), which leaves no room for the answer")
