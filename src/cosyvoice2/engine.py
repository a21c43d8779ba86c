"""Serving engine: many requests at once on one set of models, each as if it ran alone.

Who does what (all model weights are shared read-only; no request state lives on a model):

* **the caller's thread** (one per request, e.g. a server worker) runs ``Synthesizer.run``: text frontend,
  flow and vocoder. Flow/vocoder calls hold one of ``flow_slots`` (default 1: on a small CPU two flow
  calls at once only fight over the same cores; slots go first come, first served);
* **one LM worker thread** owns a batched KV cache (one row per active request) and runs every backbone
  call: the single-token decode steps of all requests that are waiting go through the backbone as one
  batch (a decode step reads every weight once, so B rows cost little more than one), prefills run one
  request at a time;
* **one producer thread per LM request** runs the unchanged decoding protocol (``CosyVoice2LM.generate``
  or ``generate_bistream``, with the request's own ``SamplingState`` and ``torch.Generator``), routing
  each backbone call to the worker through the ``step`` hook, and puts speech tokens on the request's
  queue. So the LM keeps decoding while the caller's thread runs the flow, and a request's tokens are
  the ones it would get alone with the same seed (batching changes the backbone's float rounding only,
  ~1e-6 on the log-probs).
* **one flow thread** (``FlowBatcher``, with ``flow_batch``) runs the ODE of every fast-stream chunk: a
  request's thread runs the chunk's encoder (``Flow.stream_prepare``), hands the block to the batcher and
  waits; the batcher runs one ODE step at a time as one estimator call over every block waiting or in
  progress (up to ``flow_batch_max``; each block at its own step, so a block joins at the next step
  instead of waiting for a batch to finish, and a lone block starts at once), then hands each its own
  result. The estimator is ~2/3 of the CPU time and compute bound; batching gives its GEMMs more rows
  and pays the per-op dispatch once for all streams (full size, 4 streams: 0.79x the CPU time of one call
  per stream, bench/README.md). What stays per stream: the noise (the flow's fixed table at the stream's
  own frame positions, as the official code), the prompt head and key/value tail each block attends to,
  the conv contexts, the attention mask. Batched rows round differently in the GEMMs: a stream's mel
  then differs from its lone run by ~3e-6 (mel values up to ~8), not bit for bit (tests/test_engine.py);
  a lone block runs exactly the unbatched computation.

Closing a request's audio iterator cancels it: its pending backbone call is dropped and its cache row is
free for the next request before ``close()`` returns. When no request is active the KV cache is released.
``Engine.run``'s iterator can also be closed from another thread while its request is working: a flow
block waiting in (or stepping through) the batcher is dropped at once, the request's thread stops with
``Cancelled`` and its state (flow caches, vocoder state, LM row) is freed as it unwinds.

Prompt cache (``PromptCache``, a byte-bounded LRU shared by all requests) keeps, per voice content:

* the flow's streaming state after the voice prompt (encoder + estimator keys/values of every prompt
  frame, ``Flow.stream_start``): the most expensive prompt-only work (a 3 s prompt is as much flow
  work as 3 s of speech) and exactly reusable, since later frames only read it;
* with ``lm_prefix_cache``, the LM keys/values of ``[SOS] + prompt text`` (transcript or instruction).
  The LM input is ``[SOS] prompt_text text [TASK] prompt_speech``, so only that head is shared between
  requests of one voice: prompt speech comes after the request's own text and its keys depend on it.
  The cached head is reused position for position (same inputs, same causal attention); only the
  blocking of the prefill GEMMs differs (tests check the tokens are unchanged).

The voice features themselves (prompt tokens, mel, speaker embedding) are already cached by the voice
(``VoiceReference``, saved as ``.voice`` files). Cache keys are content hashes, so a voice re-read from
its file for every request still hits.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
import warnings
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .flow import Flow, FlowBlock
from .lm import CosyVoice2LM, Int8DynamicLinear, KVCache
from .synthesis import Cancelled, CancelToken, Request, Synthesizer, _Prompt

# --------------------------------------------------------------------------------------------------
# Prompt cache
# --------------------------------------------------------------------------------------------------


class PromptCache:
    """Thread-safe LRU of per-voice precomputations, bounded by their total size in bytes.

    ``get(key, compute, nbytes)`` returns ``(value, hit)``. Concurrent misses of one key compute it once
    (the others wait). A value larger than the whole budget is returned but not kept.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._items: OrderedDict[object, tuple[object, int]] = OrderedDict()
        self._inflight: dict[object, threading.Event] = {}
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key, compute: Callable[[], object], nbytes: Callable[[object], int]) -> tuple[object, bool]:
        while True:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    self.hits += 1
                    return self._items[key][0], True
                event = self._inflight.get(key)
                if event is None:
                    event = self._inflight[key] = threading.Event()
                    break
            event.wait()  # someone else is computing it; then look again
        try:
            value = compute()
            size = int(nbytes(value))
            with self._lock:
                self.misses += 1
                if size <= self.max_bytes:
                    self._items[key] = (value, size)
                    self.nbytes += size
                    while self.nbytes > self.max_bytes:
                        _, (_, old) = self._items.popitem(last=False)
                        self.nbytes -= old
            return value, False
        finally:
            with self._lock:
                del self._inflight[key]
            event.set()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0


@dataclass(frozen=True)
class PrefixKV:
    """LM keys/values of a shared input head, per layer [Hkv, p, hd]."""

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


# --------------------------------------------------------------------------------------------------
# LM worker: one batched KV cache, one thread running every backbone call
# --------------------------------------------------------------------------------------------------


@dataclass
class _Call:
    """One backbone call of one request: feed x [1, T, D] (T may be 0 with ``load``)."""

    session: _Session
    x: Tensor
    load: PrefixKV | None = None  # put these keys/values in the row first
    extract: int = 0  # return a copy of the first ``extract`` positions of the row
    fresh: bool = False  # first call of the session: the row starts empty
    done: threading.Event = field(default_factory=threading.Event)
    result: Tensor | None = None
    kv: PrefixKV | None = None
    error: BaseException | None = None


_SAMPLING, _SUBMITTED, _PARKED, _CLOSED = "sampling", "submitted", "parked", "closed"


class _Session:
    """One request's use of the worker: a cache row and the ``step`` callable handed to the LM."""

    def __init__(self, worker: LMWorker, prefix: tuple[object, int] | None) -> None:
        self.worker = worker
        self.prefix = prefix  # (cache key, length) of a shareable input head, or None
        self.row: int | None = None
        self.state = _SAMPLING
        self.cancelled = False
        self.started = False
        self.release_after_call = False

    def __call__(self, x: Tensor) -> Tensor:
        """The LM's ``step``: x [1, T, D] -> log-probs [1, V] (blocks until the worker ran it)."""
        fresh, self.started = not self.started, True
        if fresh and self.prefix is not None and self.worker.prompts is not None:
            key, p = self.prefix
            if x.shape[1] > p:
                kv, hit = self.worker.prompts.get(
                    key, lambda: self._submit(_Call(self, x[:, :p], extract=p, fresh=True)).kv, _kv_nbytes
                )
                if hit:
                    return self._submit(_Call(self, x[:, p:], load=kv, fresh=True)).result
                return self._submit(_Call(self, x[:, p:])).result
        return self._submit(_Call(self, x, fresh=fresh)).result

    def _submit(self, call: _Call) -> _Call:
        w = self.worker
        with w._cv:
            if self.cancelled or self.row is None:
                raise Cancelled()
            self.state = _SUBMITTED
            w._pending[self.row] = call
            w._cv.notify_all()
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call

    def park(self) -> None:
        """The producer waits for outside input (streamed text): don't hold batches for it."""
        with self.worker._cv:
            if self.state == _SAMPLING:
                self.state = _PARKED

    def unpark(self) -> None:
        with self.worker._cv:
            if self.state == _PARKED:
                self.state = _SAMPLING
                self.worker._cv.notify_all()

    def cancel(self, wait_s: float = 60.0) -> None:
        """Stop the request; returns once its row is free (at most one backbone call later)."""
        self.worker._cancel(self, wait_s)


def _kv_nbytes(kv: PrefixKV) -> int:
    return kv.nbytes


class LMWorker:
    """Runs the backbone calls of all sessions on one KV cache with a row per session.

    ``max_rows``: sessions decoding at once (more wait for a free row). ``batch_wait_s``: after a step,
    how long to wait for the other rows' next decode calls (their producers are sampling) before running
    a smaller batch. ``threads``: torch intra-op threads of the worker thread (None: the process default).
    """

    def __init__(
        self,
        lm: CosyVoice2LM,
        *,
        max_rows: int = 8,
        batch_wait_s: float = 0.005,
        prompts: PromptCache | None = None,
        threads: int | None = None,
    ) -> None:
        self.lm = lm
        self.max_rows = int(max_rows)
        self.batch_wait_s = float(batch_wait_s)
        self.prompts = prompts
        self.threads = threads
        self.cache: KVCache | None = None
        self._cv = threading.Condition()
        self._pending: dict[int, _Call] = {}
        self._executing: set[int] = set()
        self._sessions: dict[int, _Session] = {}
        self._stop = False
        self._holds = 0
        self.steps = 0  # backbone calls made (for stats)
        self.batched_rows = 0  # rows over all batched decode calls
        self._thread = threading.Thread(target=self._loop, name="cosyvoice2-lm", daemon=True)
        self._thread.start()

    # -- sessions ---------------------------------------------------------------------------------

    def session(self, prefix: tuple[object, int] | None = None) -> _Session:
        return _Session(self, prefix)

    def open(self, s: _Session) -> None:
        """Give the session a row (blocks while all rows are taken)."""
        with self._cv:
            while not s.cancelled and not self._stop and len(self._sessions) >= self.max_rows:
                self._cv.wait()
            if self._stop:
                raise RuntimeError("the engine was closed")
            if s.cancelled:
                raise Cancelled()
            s.row = next(r for r in itertools.count() if r not in self._sessions)
            self._sessions[s.row] = s
            s.state = _SAMPLING

    def close(self, s: _Session) -> None:
        with self._cv:
            s.state = _CLOSED
            self._release(s)

    def _release(self, s: _Session) -> None:
        """Free the session's row unless the worker is running it right now (then after that call)."""
        if s.row is None:
            return
        call = self._pending.get(s.row)
        if call is not None and call.session is s:
            del self._pending[s.row]
            call.error = Cancelled()
            call.done.set()
        if s.row in self._executing:
            s.release_after_call = True
            return
        if self._sessions.get(s.row) is s:
            del self._sessions[s.row]
        s.row = None
        self._cv.notify_all()

    def _cancel(self, s: _Session, wait_s: float) -> None:
        with self._cv:
            s.cancelled = True
            self._release(s)
            self._cv.notify_all()
            deadline = time.monotonic() + wait_s
            while s.row is not None and time.monotonic() < deadline:
                self._cv.wait(deadline - time.monotonic())

    @contextlib.contextmanager
    def hold(self):
        """Start no backbone call while inside (a request's first flow chunk gets the cores to itself)."""
        with self._cv:
            self._holds += 1
        try:
            yield
        finally:
            with self._cv:
                self._holds -= 1
                self._cv.notify_all()

    @property
    def active_rows(self) -> int:
        with self._cv:
            return len(self._sessions)

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=10)

    # -- the worker thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while True:
                with self._cv:
                    while (not self._pending or self._holds) and not self._stop:
                        if not self._sessions:
                            self.cache = None  # idle: give the cache memory back
                        self._cv.wait()
                    if self._stop:
                        for call in self._pending.values():
                            call.error = Cancelled()
                            call.done.set()
                        return
                    # Hold the batch briefly for rows whose producers are sampling their next token.
                    deadline = time.monotonic() + self.batch_wait_s
                    while any(s.state == _SAMPLING for s in self._sessions.values()):
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cv.wait(left)
                    calls = list(self._pending.values())
                    self._pending.clear()
                    self._executing = {c.session.row for c in calls}
                try:
                    self._grow_rows(max(self._executing) + 1)
                    self._execute(calls)
                except BaseException as e:  # noqa: BLE001 - e.g. out of memory: fail these calls only
                    for c in calls:
                        c.error = c.error or e
                with self._cv:
                    # Mark the rows as sampling before waking their producers, so the next batch waits
                    # for each of them (a producer that wakes late must not look like an idle row).
                    for c in calls:
                        if c.session.state == _SUBMITTED:
                            c.session.state = _SAMPLING
                        c.done.set()
                    self._executing = set()
                    for s in list(self._sessions.values()):
                        if s.release_after_call:
                            s.release_after_call = False
                            self._release(s)
                    self._cv.notify_all()

    def _grow_rows(self, rows: int) -> None:
        """Make the cache at least ``rows`` rows (new rows empty, old rows kept)."""
        old = self.cache
        if old is not None and old.batch_size >= rows:
            return
        cap = 256 if old is None else old.capacity
        new = self.lm.new_cache(rows, cap)
        if old is not None:
            b = old.batch_size
            for store, src in ((new.keys, old.keys), (new.values, old.values)):
                for dst, s in zip(store, src):
                    dst[:b] = s
            new.lengths[:b] = old.lengths
        self.cache = new

    def _execute(self, calls: list[_Call]) -> None:
        cache = self.cache
        decode = [c for c in calls if c.x.shape[1] == 1 and not c.fresh and c.load is None and not c.extract]
        single = [c for c in calls if c not in decode]
        if decode:
            decode.sort(key=lambda c: c.session.row)
            self._run(decode, lambda: self._decode(cache, decode))
        for c in single:
            self._run([c], lambda c=c: self._single(cache, c))
        self.steps += int(bool(decode)) + len(single)
        self.batched_rows += len(decode)

    @staticmethod
    def _run(calls: list[_Call], fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the requests; the worker lives on
            for c in calls:
                c.error = e

    def _decode(self, cache: KVCache, calls: list[_Call]) -> None:
        rows = [c.session.row for c in calls]
        logp = self.lm.step(torch.cat([c.x for c in calls]), cache, rows)  # [B, V]
        for i, c in enumerate(calls):
            c.result = logp[i : i + 1]

    def _single(self, cache: KVCache, c: _Call) -> None:
        row = c.session.row
        if c.fresh:
            cache.lengths[row] = 0
        if c.load is not None:
            p = c.load.length
            cache.reserve(p + c.x.shape[1])
            for layer in range(len(cache.keys)):
                cache.keys[layer][row, :, :p] = c.load.keys[layer]
                cache.values[layer][row, :, :p] = c.load.values[layer]
            cache.lengths[row] = p
        if c.x.shape[1]:
            c.result = self.lm.step(c.x, cache, [row])
        if c.extract:
            p = c.extract
            c.kv = PrefixKV(
                tuple(k[row, :, :p].clone() for k in cache.keys),
                tuple(v[row, :, :p].clone() for v in cache.values),
            )


# --------------------------------------------------------------------------------------------------
# LM backend for the synthesizer: producers on the worker
# --------------------------------------------------------------------------------------------------

_END = object()


class BatchedLM:
    """``synthesis.LMBackend`` whose requests decode on a shared ``LMWorker``."""

    def __init__(self, lm: CosyVoice2LM, worker: LMWorker, *, prefix_cache: bool) -> None:
        self.lm = lm
        self.worker = worker
        self.prefix_cache = prefix_cache

    def generate(self, text_ids: list[int], prompt: _Prompt, gen: torch.Generator) -> Iterator[int]:
        prefix = None
        if self.prefix_cache and prompt.lm_text:
            prefix = (("lm-prefix", tuple(prompt.lm_text)), 1 + len(prompt.lm_text))  # [SOS] + prompt text
        session = self.worker.session(prefix)

        def body():
            return self.lm.generate(text_ids, prompt.lm_text, prompt.lm_speech, generator=gen, step=session)

        return self._spawn(session, body)

    def generate_bistream(
        self, chunks: Iterator[list[int]], prompt: _Prompt, gen: torch.Generator
    ) -> Iterator[int]:
        session = self.worker.session()

        def body():
            return self.lm.generate_bistream(
                _parked(chunks, session), prompt.lm_text, prompt.lm_speech, generator=gen, step=session
            )

        return self._spawn(session, body)

    def _spawn(self, session: _Session, body: Callable[[], Iterable[int]]) -> Iterator[int]:
        out: queue.SimpleQueue = queue.SimpleQueue()

        def produce() -> None:
            try:
                self.worker.open(session)
                for tok in body():
                    if session.cancelled:
                        break
                    out.put(tok)
                out.put(_END)
            except Cancelled:
                out.put(_END)
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer's thread
                out.put(e)
            finally:
                self.worker.close(session)

        threading.Thread(target=produce, name="cosyvoice2-lm-request", daemon=True).start()
        return _TokenStream(out, session)


class _TokenStream:
    """The consumer's side of a producer: speech ids as they come; ``close()`` cancels the request (also
    before the first id was read, unlike a generator's ``close``)."""

    def __init__(self, out: queue.SimpleQueue, session: _Session) -> None:
        self._out, self._session, self._done = out, session, False

    def __iter__(self) -> _TokenStream:
        return self

    def __next__(self) -> int:
        if self._done:
            raise StopIteration
        item = self._out.get()
        if item is _END or isinstance(item, BaseException):
            self.close()
            if item is _END:
                raise StopIteration
            raise item
        return item

    def close(self) -> None:
        self._done = True
        self._session.cancel()


def _parked(chunks: Iterable[list[int]], session: _Session) -> Iterator[list[int]]:
    """Streamed text for a producer: while it waits for the next piece, batches don't wait for it."""
    it = iter(chunks)
    while True:
        session.park()
        try:
            item = next(it)
        except StopIteration:
            return
        finally:
            session.unpark()
        if session.cancelled:
            raise Cancelled()
        yield item


# --------------------------------------------------------------------------------------------------
# Flow batcher: one thread running the ODE steps of every stream's flow block
# --------------------------------------------------------------------------------------------------


class _Slots:
    """``n`` compute slots handed out first come, first served: a released slot goes to the thread that
    has waited longest. (A plain semaphore lets the flow thread, which releases and re-takes its slot
    between ODE steps, take it back before a woken request thread runs: the requests' vocoder calls
    would wait for all the flow work.)"""

    def __init__(self, n: int) -> None:
        self._lock = threading.Lock()
        self._free = max(1, int(n))
        self._waiters: deque[threading.Event] = deque()

    @contextlib.contextmanager
    def __call__(self):
        with self._lock:
            mine = None
            if self._free and not self._waiters:
                self._free -= 1
            else:
                mine = threading.Event()
                self._waiters.append(mine)
        if mine is not None:
            mine.wait()  # the releasing thread handed its slot over
        try:
            yield
        finally:
            with self._lock:
                if self._waiters:
                    self._waiters.popleft().set()
                else:
                    self._free += 1


class _FlowJob:
    """One stream's block in the batcher (``block`` is dropped once the job is over)."""

    __slots__ = ("block", "submitted", "started", "shared", "running", "error", "done")

    def __init__(self, block: FlowBlock) -> None:
        self.block: FlowBlock | None = block
        self.submitted = time.perf_counter()
        self.started: float | None = None  # when its first estimator call began
        self.shared = 0  # most blocks in one of its estimator calls
        self.running = False  # in the estimator call being made now
        self.error: BaseException | None = None
        self.done = threading.Event()


class FlowBatcher:
    """Solves the ODE of flow blocks (``Flow.stream_prepare``) from many streams, batched per ODE step.

    ``solve(block)`` blocks until the block's ODE is solved. The flow thread loops: take the blocks
    waiting (up to ``max_blocks`` in progress, first come first served), run one ``Flow.euler_step`` over
    all blocks in progress (each at its own step), retire the finished ones. So there is no batching
    delay: a lone block starts at once, and a block arriving while others are being solved joins them at
    their next step (``wait_s`` > 0 holds the first step of a batch that long for company).
    Each estimator call takes one of the engine's compute slots (``slot``), like any flow/vocoder call.
    Cancelling a job (``CancelToken``) drops it at once: its ``solve`` raises ``Cancelled`` and the
    batcher keeps no reference to the block after the estimator call it is in, if any.
    """

    def __init__(
        self,
        flow: Flow,
        *,
        max_blocks: int = 4,
        wait_s: float = 0.0,
        slot: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        self.flow = flow
        self.max_blocks = max(1, int(max_blocks))
        self.wait_s = float(wait_s)
        self.slot = slot or contextlib.nullcontext
        self._cv = threading.Condition()
        self._queue: deque[_FlowJob] = deque()
        self._active: list[_FlowJob] = []
        self._stop = False
        self.calls = 0  # estimator calls made
        self.rows = 0  # blocks over all estimator calls (rows / calls: mean blocks per call)
        self.max_rows = 0  # most blocks in one call
        self._thread = threading.Thread(target=self._loop, name="cosyvoice2-flow", daemon=True)
        self._thread.start()

    def solve(self, block: FlowBlock, cancel: CancelToken | None = None) -> tuple[float, int]:
        """Run ``block``'s ODE to the end. Returns (seconds it waited before its first estimator call, the
        most blocks in one of its calls). Raises ``Cancelled`` as soon as ``cancel`` is cancelled."""
        if block.done:
            return 0.0, 1
        job = _FlowJob(block)
        with self._cv:
            if self._stop:
                raise RuntimeError("the engine was closed")
            self._queue.append(job)
            self._cv.notify_all()
        remove = None if cancel is None else cancel.add(lambda: self._drop(job))
        try:
            job.done.wait()
        finally:
            if remove is not None:
                remove()
        if job.error is not None:
            raise job.error
        return job.started - job.submitted, job.shared

    @property
    def pending(self) -> int:
        """Blocks waiting or in progress."""
        with self._cv:
            return len(self._queue) + len(self._active)

    def _drop(self, job: _FlowJob) -> None:
        with self._cv:
            if job.done.is_set():
                return
            if job in self._queue:
                self._queue.remove(job)
            elif job in self._active and not job.running:
                self._active.remove(job)
            # else it is in the estimator call being made: the flow thread lets go of it after that call.
            if not job.running:
                job.block = None
            job.error = Cancelled()
            job.done.set()
            self._cv.notify_all()

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._queue or self._active) and not self._stop:
                    self._cv.wait()
                if self._stop:
                    for job in (*self._queue, *self._active):
                        job.error, job.block = RuntimeError("the engine was closed"), None
                        job.done.set()
                    return
                if self.wait_s > 0 and not self._active:  # optional: let a new batch gather company
                    deadline = time.monotonic() + self.wait_s
                    while len(self._queue) < self.max_blocks and not self._stop:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cv.wait(left)
            with self.slot():
                # Take the blocks only now that the cores are ours: whatever arrived meanwhile joins, and a
                # block cancelled while we waited for the slot is already gone.
                with self._cv:
                    while self._queue and len(self._active) < self.max_blocks:
                        self._active.append(self._queue.popleft())
                    batch = list(self._active)
                    for job in batch:
                        job.running = True
                if batch:
                    self._step(batch)
            if batch:
                self._retire(batch)
            batch = None  # hold no block while idle

    def _retire(self, batch: list[_FlowJob]) -> None:
        """After an estimator call: hand back the blocks that are solved, failed or cancelled."""
        with self._cv:
            self.calls += 1
            self.rows += len(batch)
            self.max_rows = max(self.max_rows, len(batch))
            for job in batch:
                job.running = False
                job.shared = max(job.shared, len(batch))
                if job.done.is_set() or job.error is not None or job.block.done:
                    if job in self._active:
                        self._active.remove(job)
                    job.block = None
                    job.done.set()
            self._cv.notify_all()

    def _step(self, batch: list[_FlowJob]) -> None:
        """One ODE step of every job's block; on an error, each block alone (the error goes to its own)."""
        now = time.perf_counter()
        for job in batch:
            if job.started is None:
                job.started = now
        try:
            self.flow.euler_step([job.block for job in batch])
            return
        except BaseException as e:  # noqa: BLE001 - handed to the requests; the thread lives on
            if len(batch) == 1:
                batch[0].error = e
                return
        # A block only advances when the whole call succeeded, so each can be retried alone.
        for job in batch:
            if job.done.is_set():  # cancelled meanwhile
                continue
            try:
                self.flow.euler_step([job.block])
            except BaseException as e:  # noqa: BLE001
                job.error = e


# --------------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------------


class RequestStream:
    """A request's audio chunks (float32 [n]), from ``Engine.run``.

    ``close()`` cancels the request, also from another thread while its chunk is being made (then its
    flow block is dropped from the batcher at once, and the request's thread stops at its next checkpoint
    with all its state released); after a cancel the iteration just ends.
    """

    def __init__(self, chunks: Iterator[Tensor], cancel: CancelToken) -> None:
        self._chunks, self._cancel = chunks, cancel

    def __iter__(self) -> RequestStream:
        return self

    def __next__(self) -> Tensor:
        try:
            return next(self._chunks)
        except Cancelled:
            if self._cancel.cancelled:
                raise StopIteration from None
            raise

    @property
    def cancelled(self) -> bool:
        return self._cancel.cancelled

    def close(self) -> None:
        self._cancel.cancel()
        with contextlib.suppress(ValueError):  # running in another thread right now: it stops by itself
            self._chunks.close()


@dataclass(frozen=True)
class EngineOptions:
    """Serving options (all keyword arguments of ``cosyvoice2.load``).

    ``max_batch``: requests decoding at once (more wait). ``flow_slots``: flow/vocoder calls at once.
    ``prompt_cache_mb``: budget of the prompt cache (a full-size 3 s voice holds ~700 MB of flow state in
    float32, half with ``flow_cache_dtype=torch.float16``). ``lm_prefix_cache``: reuse the LM keys of
    ``[SOS] + prompt text``. ``static_chunks``: fast streaming intersects its block-causal attention with
    the official 25-token chunk masks.
    ``lm_threads``: torch intra-op threads of the LM thread (None: the process default). Flow and vocoder
    calls use the caller's thread's default, always the same, so a seed gives the same audio however
    many requests run at once (the thread count changes float rounding). Measured on 2 cores: the LM
    and a flow call running side by side with 2 threads each cost less than running them one after the
    other; mixing 2 + 1 threads on 2 cores was 3x slower (spinning OpenMP workers), see bench/README.md.
    ``flow_batch``: fast-stream flow chunks of concurrent requests share estimator calls (``FlowBatcher``,
    one thread, which uses the process's thread count as it was when the engine was made).
    ``flow_batch_max``: most chunks per call; ``flow_batch_wait_ms``: how long the first ODE step of a new
    batch waits for other chunks (0: never; a lone request is then never delayed). With batching a
    request's audio equals its lone run up to float rounding (mel within ~3e-6), not bit for bit;
    ``flow_batch=False`` gives every request exactly its lone-run audio. On by default: measured 0.79x
    the flow CPU time at 4 streams (~+18 % end-to-end throughput), nothing lost by a lone request
    (bench/README.md).
    """

    max_batch: int = 8
    batch_wait_ms: float = 5.0
    flow_slots: int = 1
    prompt_cache_mb: float = 2048.0
    lm_prefix_cache: bool = True
    flow_cache_dtype: torch.dtype = torch.float32
    static_chunks: bool = False
    lm_threads: int | None = None
    flow_batch: bool = True
    flow_batch_max: int = 4
    flow_batch_wait_ms: float = 0.0


class Engine:
    """Serves any number of concurrent requests on one ``Models``; see the module docstring."""

    def __init__(self, models, options: EngineOptions | None = None) -> None:
        self.models = models
        self.options = opts = options or EngineOptions()
        self.prompts = PromptCache(int(opts.prompt_cache_mb * 2**20))
        self._slots = _Slots(opts.flow_slots)
        self.worker: LMWorker | None = None
        lm_backend = None
        if models.lm is not None:
            self.worker = LMWorker(
                models.lm,
                max_rows=opts.max_batch,
                batch_wait_s=opts.batch_wait_ms / 1000,
                prompts=self.prompts,
                threads=opts.lm_threads,
            )
            lm_backend = BatchedLM(models.lm, self.worker, prefix_cache=opts.lm_prefix_cache)
        self.flow_batcher: FlowBatcher | None = None
        if opts.flow_batch:
            self.flow_batcher = FlowBatcher(
                models.flow,
                max_blocks=opts.flow_batch_max,
                wait_s=opts.flow_batch_wait_ms / 1000,
                slot=self._slots,
            )
        self.synth = Synthesizer(
            models,
            lm=lm_backend,
            flow_start=self._flow_start,
            compute=self._compute,
            flow_cache_dtype=opts.flow_cache_dtype,
            static_chunks=opts.static_chunks,
            flow_solve=None if self.flow_batcher is None else self._flow_solve,
        )

    def run(self, req: Request, cancel: CancelToken | None = None) -> RequestStream:
        """Audio chunks of one request (float32 [n]); close the iterator, or cancel ``cancel``, from any
        thread to cancel it (also while a chunk is being made)."""
        cancel = cancel or CancelToken()
        return RequestStream(self.synth.run(req, cancel), cancel)

    @contextlib.contextmanager
    def _compute(self, first: bool = False):
        """Around flow/vocoder work: a flow slot; for a request's first chunk, the LM also pauses (the
        two share the cores; measured on 2 cores the first chunk then takes ~0.6x as long)."""
        with self._slots():
            if first and self.worker is not None:
                with self.worker.hold():
                    yield
            else:
                yield

    def _flow_solve(self, block: FlowBlock, first: bool, cancel: CancelToken | None) -> tuple[float, int]:
        """A fast-stream chunk's ODE, in the flow batcher; a stream's first chunk pauses the LM meanwhile
        (as ``_compute`` does)."""
        with self.worker.hold() if first and self.worker is not None else contextlib.nullcontext():
            return self.flow_batcher.solve(block, cancel)

    def _flow_start(self, prompt: _Prompt, compute: Callable[[], object]) -> tuple[object, bool]:
        o = self.options
        key = ("flow", prompt.flow_key(), str(o.flow_cache_dtype), o.static_chunks)
        return self.prompts.get(key, compute, lambda state: state.nbytes)

    def warm_voice(self, req: Request) -> None:
        """Precompute the prompt cache entries of a request's voice (e.g. when a voice is saved)."""
        prompt = self.synth._prompt(req)
        self.synth.flow_stream_start(prompt)

    def stats(self) -> dict:
        w, b = self.worker, self.flow_batcher
        return {
            "active_rows": 0 if w is None else w.active_rows,
            "lm_steps": 0 if w is None else w.steps,
            "lm_batched_rows": 0 if w is None else w.batched_rows,
            "prompt_cache_entries": len(self.prompts),
            "prompt_cache_bytes": self.prompts.nbytes,
            "prompt_cache_hits": self.prompts.hits,
            "prompt_cache_misses": self.prompts.misses,
            "flow_batch_calls": 0 if b is None else b.calls,
            "flow_batch_rows": 0 if b is None else b.rows,
            "flow_batch_max_rows": 0 if b is None else b.max_rows,
        }

    def close(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
        if self.flow_batcher is not None:
            self.flow_batcher.shutdown()


# --------------------------------------------------------------------------------------------------
# Opt-in CPU speed: int8 and bf16 flow estimator, bf16 LM backbone (``compute="fast"``, cosyvoice2/cpu.py)
# --------------------------------------------------------------------------------------------------

_FLOW_LINEARS = ("to_q", "to_k", "to_v", "to_out", "fc1", "fc2")


def int8_full_range() -> bool:
    """Whether int8 activations may use all 8 bits on this CPU.

    fbgemm's AVX2 kernel multiplies u8 x s8 pairs with vpmaddubsw, whose int16 pair sums saturate, so
    activations are quantised to 7 bits there (``reduce_range``). Its AVX512-VNNI kernel (vpdpbusd)
    accumulates in int32 and cannot saturate: 8 bits halve the quantisation error at the same speed
    (measured GEMM error 0.017 -> 0.009; default model: LM next-token total variation 0.135 -> 0.082,
    flow mel deviation 0.011 -> 0.006).
    """
    from .cpu import detect

    return "avx512_vnni" in detect().flags


class Int8Linear(Int8DynamicLinear):
    """``lm.Int8DynamicLinear`` with 8-bit activations where the CPU allows it (``int8_full_range``)."""

    def __init__(self, linear: nn.Linear, reduce_range: bool) -> None:
        super().__init__(linear)
        self.reduce_range = reduce_range

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, self.reduce_range).to(x.dtype)


def _int8(linear: nn.Linear) -> Int8Linear:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch marks its eager quantised-tensor API as deprecated
        return Int8Linear(linear, reduce_range=not int8_full_range())


def quantize_lm_int8(model: CosyVoice2LM) -> CosyVoice2LM:
    """``lm.quantize_backbone_int8`` with ``Int8Linear`` (8-bit activations on VNNI CPUs), in place."""
    return _swap_backbone_linears(model, _int8)


def _swap_backbone_linears(model: CosyVoice2LM, make) -> CosyVoice2LM:
    """Replace every LM backbone projection (qkv, o, gate_up, down) still an ``nn.Linear`` by
    ``make(linear)``, in place. Embeddings, norms and the speech head are left as they are."""
    for layer in model.backbone.layers:
        pairs = ((layer.attn, "qkv"), (layer.attn, "o"), (layer.mlp, "gate_up"), (layer.mlp, "down"))
        for owner, name in pairs:
            child = getattr(owner, name)
            if isinstance(child, nn.Linear):
                setattr(owner, name, make(child))
    return model


def quantize_flow_int8(flow: nn.Module) -> nn.Module:
    """Swap the flow estimator's transformer Linears (q, k, v, out, feed-forward) for int8 dynamic ones.

    Those Linears are ~85 % of the estimator's multiply-adds, and the estimator runs 10 ODE steps x 2 CFG
    rows per frame, so it dominates synthesis time on CPU. Opt-in: the mel moves (see bench/README.md).
    """
    for module in flow.estimator.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name in _FLOW_LINEARS:
                setattr(module, name, _int8(child))
    return flow


class Bf16Estimator(nn.Module):
    """The flow estimator under CPU bf16 autocast: its GEMMs, convs and attention run in bfloat16.

    Same interface as ``flow.Estimator`` (``run``, ``forward``, ``cfg``), returns float32, so the ODE state
    x, the guidance mix and the Euler update stay float32 (only the velocity of each step is rounded).
    The autocast context is entered inside ``run`` because it is thread-local: the engine's flow batcher
    calls the estimator from its own thread. Measured on a 2-core AVX512_BF16 EPYC (full size, 1 thread,
    one ODE step): 206 frames 1.65 s fp32 -> 0.60 s (int8: 0.69 s), 56 frames 0.43 -> 0.18 s (int8 0.18);
    the mel moved by 0.0076 mean (int8: 0.0090). Without native bf16 this is ~10x slower than fp32.
    """

    def __init__(self, estimator: nn.Module) -> None:
        super().__init__()
        self.inner = estimator
        self.cfg = estimator.cfg

    def run(self, *args, **kwargs) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v = self.inner.run(*args, **kwargs)
        return v.float()

    def forward(self, *args, **kwargs) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v = self.inner(*args, **kwargs)
        return v.float()


def cast_flow_bf16(flow: Flow) -> Flow:
    """Run the flow estimator in bf16 (``Bf16Estimator``), in place; the encoder (once per token, not per
    ODE step and CFG row) stays float32.

    The estimator's Linear and Conv1d weights are stored in bf16 (norms stay float32). Autocast would round
    them to bf16 at every call anyway, so the outputs are the same (test_compute.py); its weight-cast cache
    lives only inside one ``autocast`` block, so every ODE step used to re-read the 71 M float32 weights
    (full size) and write bf16 copies. Stored in bf16 they take half the memory, and a full-size step over
    25-100 streamed tokens measured 0.67-0.99x of autocast's time (2 threads, AMX); over 3-11 tokens a step
    costs ~90-120 ms in any precision (bench/README.md "amx": bound by the ~2000 small ops of a step).
    """
    if not isinstance(flow.estimator, Bf16Estimator):
        flow.estimator = Bf16Estimator(flow.estimator)
        for module in flow.estimator.inner.modules():
            if isinstance(module, nn.Linear | nn.Conv1d):
                module.to(torch.bfloat16)
    return flow


def cast_hift_bf16(hift: nn.Module) -> nn.Module:
    """Run the vocoder's decoder convolutions in bf16 (``HiFT.decode_bf16``), in place; their weights are
    stored in bf16 (autocast would round them at every call anyway). The f0 predictor, the sine source and
    the (i)STFT stay float32: the source integrates f0 into a phase, where bf16's 3 significant digits
    would drift. Full-size HiFT, 100 mel frames, 1 thread, AMX: 0.29 s CPU against 0.56 s in float32, audio
    within 0.9 % RMS of float32's on random weights (bench/README.md "amx")."""
    if not hift.decode_bf16:
        hift.decode_bf16 = True
        decoder = [hift.conv_pre, *hift.ups, *hift.source_downs, *hift.source_resblocks, *hift.resblocks]
        for part in [*decoder, hift.conv_post]:
            for module in part.modules():
                if isinstance(module, nn.Conv1d | nn.ConvTranspose1d):
                    module.to(torch.bfloat16)
    return hift


class Bf16Linear(nn.Module):
    """Inference-only Linear with bfloat16 weights: x [..., in] (any float dtype) -> [..., out] in x's dtype.

    For the memory-bound LM decode: half the weight bytes of fp32, and each output row depends only on its
    own input row (unlike ``Int8DynamicLinear``, whose activation scale is shared by the rows of a call).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_features = linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


def cast_backbone_bf16(model: CosyVoice2LM) -> CosyVoice2LM:
    """Swap every LM backbone projection (qkv, o, gate_up, down) for ``Bf16Linear``, in place. Embeddings,
    norms and the speech head stay fp32, as with ``lm.quantize_backbone_int8``."""
    return _swap_backbone_linears(model, Bf16Linear)
