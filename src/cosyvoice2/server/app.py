"""The HTTP/WebSocket server: an OpenAI-compatible speech API, streaming both ways, and a voice library.

``create_app(tts, settings)`` builds the FastAPI app around one loaded model. Routes:

=========================================  ============================================================
``POST /v1/audio/speech``                  OpenAI schema (+ ``instruct``, ``seed``, ``stream``,
                                           ``cross_lingual``); audio is
                                           streamed as it is made unless ``stream`` is false
``WS   /v1/audio/speech/stream``           text pieces in, audio frames out (protocol below)
``POST /v1/voices``                        multipart ``audio`` (+ ``text``, ``name``) -> saved voice
                                           (409 ``voice_name_taken``: names are unique)
``GET  /v1/voices``, ``/v1/voices/{id}``   the library (+ built-in speakers and OpenAI aliases)
``DELETE /v1/voices/{id}``
``GET  /v1/models``                        for clients that list models first
``GET  /health``, ``/metrics``, ``/``      liveness, Prometheus text, the demo page
=========================================  ============================================================

Voices in requests: a saved voice id (``v_...``) or name, a built-in speaker name, an OpenAI voice name
(alloy, echo, ...: mapped to the built-in speakers in a fixed order, or to the default voice when the
model has none; a saved voice with that name wins), or nothing / ``"default"`` for the default voice.
Strings are never used as file paths.

Model work is blocking and CPU-heavy, so it runs in a bounded thread pool: at most ``max_active``
requests hold a synthesis slot, up to ``max_queue`` more wait for one in arrival order (at most
``queue_timeout`` seconds), and beyond that a request gets ``429`` with ``Retry-After``. A worker hands
audio to the event loop through a small bounded buffer, so a slow client slows its own synthesis instead
of piling up memory, and a client that goes away (also while queued, or while a non-streamed request is
being made) cancels the request at once.

Every request is bounded in time and memory: ``request_timeout`` seconds of wall clock from the moment
it holds a slot; ``stall_timeout`` seconds for a client that stops reading audio (or, on the WebSocket,
``ws_idle_timeout`` without new text: empty pieces do not count); ``max_request_mb`` of flow state (a
speech-token budget, ``TooLong`` -> 413); prompt audio decoding stops past ``max_voice_seconds`` whatever
the file's header claims. Every malformed value is refused by the request schemas with a 4xx.

The voice library (``voices.py``) is SQLite + files in ``data_dir`` by default, or PostgreSQL + a shared
directory or S3 bucket that several servers share (``voice_db``, ``voice_files``); while it cannot be
reached, requests that need it get ``503 voice_library_unavailable`` with ``Retry-After``. Run as Ray
Serve replicas (``ray_serve.py``), every HTTP response names its replica in ``X-Replica``.

Without an API key the server checks ``Host`` (loopback names, the bound host and ``allowed_hosts``)
and ``Origin`` (same origin or a ``cors_origins`` entry), so a web page cannot reach it through DNS
rebinding or a cross-site WebSocket.

WebSocket protocol (``/v1/audio/speech/stream``; JSON text frames from the client, one request per
connection)::

    -> {"type": "start", "voice": "alloy", "format": "pcm", "instruct": null, "speed": 1.0, "seed": null,
        "cross_lingual": null, "text": "optional first piece"}
    <- {"type": "started", "request_id": "...", "format": "pcm", "content_type": "audio/pcm",
        "sample_rate": 24000}
    -> {"type": "text", "text": "Hello "}            (any number, as an LLM writes them)
    -> {"type": "end"}                               (no more text; "cancel" stops at once)
    <- binary frames: the audio, encoded in "format" (pcm: s16le mono at sample_rate)
    <- {"type": "done", "request_id": ..., "first_packet_latency_ms": ..., "audio_seconds": ...,
        "compute_seconds": ..., "elapsed_seconds": ..., "rtf": ..., "bytes": ..., "chunks": ...}
    <- {"type": "error", "error": {"code": ..., "message": ...}}   (instead of "done"), then close

With an API key configured, WebSocket clients send ``Authorization: Bearer KEY`` or, from a browser
(which cannot set headers on a WebSocket), the subprotocols ``cosyvoice2`` and ``cosyvoice2.key.`` +
the key in unpadded base64url (``new WebSocket(url, ["cosyvoice2", "cosyvoice2.key." + b64])``); the
server answers with ``cosyvoice2``. Keys never go in URLs (URLs end up in logs and browser history).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import hmac
import json
import logging
import math
import os
import queue
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import numpy as np
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
)
from pydantic import ValidationError as PydanticValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocketDisconnect, WebSocketState

from cosyvoice2.audio import AUDIO_FORMATS, AudioStreamEncoder, content_type, encode_audio
from cosyvoice2.config import RATES
from cosyvoice2.errors import InputError, TooLong
from cosyvoice2.synthesis import Cancelled as SynthesisCancelled
from cosyvoice2.synthesis import CancelToken

from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .voices import (
    MAX_TRANSCRIPT_CHARS,
    NameTaken,
    StorageUnavailable,
    VoiceNotFound,
    clean_name,
    open_voice_store,
)

log = logging.getLogger("cosyvoice2.server")

STATIC_DIR = Path(__file__).resolve().parent / "static"
OPENAI_VOICES = (
    "alloy",
    "ash",
    "ballad",
    "coral",
    "echo",
    "fable",
    "nova",
    "onyx",
    "sage",
    "shimmer",
    "verse",
    "marin",
    "cedar",
)
DEFAULT_VOICE_NAMES = ("", "default")
OPENAI_MIN_SPEED, OPENAI_MAX_SPEED = 0.25, 4.0
WS_ROUTE = "/v1/audio/speech/stream"
WS_SUBPROTOCOL = "cosyvoice2"  # a browser's WebSocket asks for it; the key rides in "cosyvoice2.key.<b64>"
WS_KEY_PREFIX = WS_SUBPROTOCOL + ".key."
PUBLIC_PATHS = ("/", "/health", "/favicon.ico")
PUBLIC_PREFIXES = ("/static/",)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
ERROR_CODE_KEY = "cosyvoice2.error_code"  # set in the ASGI scope by the error handlers
CLIENT_CLOSED = 499  # nginx's "client closed request": recorded when the client left before the answer


T = TypeVar("T")


async def _within(aw: Awaitable[T], timeout: float | None) -> T:
    """``await aw`` for at most ``timeout`` seconds (None: no limit), else ``TimeoutError``. Unlike
    Python 3.11's ``asyncio.wait_for``, a cancellation that arrives just as ``aw`` finishes is never
    swallowed, so a cancelled task cannot carry on (holding a slot, or reading a socket forever)."""
    async with asyncio.timeout(timeout):
        return await aw


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "cosyvoice2"


@dataclass
class Settings:
    """Server limits and options. ``data_dir`` None: $XDG_DATA_HOME/cosyvoice2 (~/.local/share/...)."""

    data_dir: str | Path | None = None
    api_key: str | None = None
    max_active: int = 2  # synthesis slots (requests doing model work at once)
    max_queue: int = 8  # requests that may wait for a slot; beyond them 429 at once
    queue_timeout: float = 30.0  # seconds a request may wait for a slot, then 429
    request_timeout: float = 300.0  # wall-clock seconds a request may hold a slot (then 408)
    stall_timeout: float = 20.0  # seconds a client may leave sent audio unread, then it is dropped
    body_timeout: float = 30.0  # seconds to receive a request body (JSON or an upload)
    max_request_mb: float = 1024.0  # flow state one request may grow (its speech-token budget)
    cors_origins: list[str] = field(default_factory=list)
    # Host names accepted without an API key besides the loopback names; "*" accepts any (see serve).
    allowed_hosts: list[str] = field(default_factory=list)
    max_input_chars: int = 4096  # POST /v1/audio/speech "input" (OpenAI's limit)
    max_stream_chars: int = 20_000  # all text pieces of one WebSocket request together
    max_message_chars: int = 4096  # one WebSocket text message
    max_json_bytes: int = 64 * 1024
    max_upload_bytes: int = 10 * 1024 * 1024  # POST /v1/voices body
    max_voice_seconds: float = 30.0
    min_voice_seconds: float = 0.5
    voice_cache_size: int = 32
    ws_start_timeout: float = 10.0  # seconds to wait for the start message
    ws_idle_timeout: float = 60.0  # seconds without a message while text is still expected
    retry_after: int = 1  # seconds, in 429 responses
    buffer_chunks: int = 4  # audio chunks a worker may run ahead of a slow client
    model_name: str = "cosyvoice2"
    # The voice library (voices.py): None/None is SQLite + files in data_dir (one machine); for several
    # servers, a postgresql:// URL and a shared directory or s3://bucket/prefix. Names are unique per
    # namespace; several deployments may share one database under different namespaces.
    voice_db: str | None = None
    voice_files: str | None = None
    voice_namespace: str = "default"
    shared_voices: bool | None = None  # None: shared unless both are the local defaults
    # Set by a Ray Serve replica: sent as X-Replica on every HTTP response and in /health.
    replica_id: str | None = None

    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir).expanduser() if self.data_dir else default_data_dir()


# ---------------------------------------------------------------------------------------------------
# Errors: every failure is {"error": {"code", "message", "type", "param"}} with a fitting status
# ---------------------------------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.param = param

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 401:
            kind = "authentication_error"
        elif self.status == 429:
            kind = "rate_limit_error"
        return {"error": {"code": self.code, "message": self.message, "type": kind, "param": self.param}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    503: "unavailable",
}


def _validation_message(err: PydanticValidationError | RequestValidationError) -> tuple[str, str | None]:
    errors = err.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    return (f"{param}: {msg}" if param else msg), param


def _as_api_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, _ClientGone):
        return ApiError(CLIENT_CLOSED, "client_closed", "the client went away")
    if isinstance(exc, NameTaken):
        message = f"{exc}; delete it first or choose another name"
        return ApiError(409, "voice_name_taken", message, param="name")
    if isinstance(exc, StorageUnavailable):
        log.warning("voice library: %s", exc)
        return ApiError(
            503,
            "voice_library_unavailable",
            "the voice library is unavailable; retry shortly",
            headers={"Retry-After": "2"},
        )
    if isinstance(exc, TooLong):
        return ApiError(413, "audio_too_long", f"{exc}; send shorter text, or split it over several requests")
    if isinstance(exc, InputError):
        return ApiError(400, "invalid_request", str(exc))
    if isinstance(exc, PydanticValidationError):
        message, param = _validation_message(exc)
        return ApiError(400, "invalid_request", message, param=param)
    # Anything else is our bug: the client gets a plain 500, the log gets the traceback (without it a
    # 500 before the first audio byte left nothing to debug from).
    log.error("unexpected error: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return ApiError(500, "internal_error", "internal server error")


# ---------------------------------------------------------------------------------------------------
# Concurrency: synthesis slots and the worker -> event loop bridge
# ---------------------------------------------------------------------------------------------------


class _Waiter:
    __slots__ = ("future", "loop", "granted")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self.granted = False


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class Slots:
    """At most ``n`` synthesis slots, and a FIFO queue of at most ``max_queue`` requests waiting for one.

    ``acquire`` (event loop) takes a free slot, or waits in the queue up to ``timeout`` seconds; a full
    queue or the timeout raises a 429 ``ApiError``. ``release`` may be called from any thread (workers
    call it when they finish): it hands the slot straight to the oldest waiter, so a freed slot cannot be
    taken by a request that arrived later. A waiter that is cancelled (its client left) after the slot
    was handed to it passes the slot on.
    """

    def __init__(self, n: int, max_queue: int, metrics: Metrics, retry_after: int = 1) -> None:
        self.n = max(1, int(n))
        self.max_queue = max(0, int(max_queue))
        self.retry_after = max(1, int(retry_after))
        self.active = 0
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._lock = threading.Lock()
        self._metrics = metrics
        metrics.max_active.set(self.n)
        metrics.max_queue.set(self.max_queue)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def _gauges(self) -> None:  # under the lock
        self._metrics.active.set(self.active)
        self._metrics.queued.set(len(self._waiters))

    def _reject(self, why: str) -> ApiError:
        self._metrics.rejected.inc()
        return ApiError(429, "rate_limited", why, headers={"Retry-After": str(self.retry_after)})

    def try_acquire(self) -> bool:
        """Take a free slot if there is one and nobody is queued for it; never waits."""
        with self._lock:
            if self.active >= self.n or self._waiters:
                return False
            self.active += 1
            self._gauges()
            return True

    async def acquire(self, timeout: float) -> None:
        t0 = time.monotonic()
        with self._lock:
            if self.active < self.n and not self._waiters:
                self.active += 1
                self._gauges()
                return
            if len(self._waiters) >= self.max_queue:
                waiter = None
            else:
                waiter = _Waiter(asyncio.get_running_loop())
                self._waiters.append(waiter)
                self._gauges()
        if waiter is None:
            raise self._reject(
                f"all {self.n} synthesis slots are busy and {self.max_queue} requests are waiting; "
                "retry shortly"
            )
        try:
            await _within(waiter.future, max(0.0, timeout))  # a worker's release() wakes it
        except BaseException as e:  # TimeoutError, or CancelledError when the client went away
            with self._lock:
                granted = waiter.granted
                if not granted:
                    self._waiters.remove(waiter)
                    self._gauges()
            if granted and isinstance(e, TimeoutError):
                pass  # the slot came at the last moment: take it
            elif granted:
                self.release()  # to the next waiter
                raise
            elif isinstance(e, TimeoutError):
                raise self._reject(
                    f"waited {timeout:g} s for one of the {self.n} synthesis slots; retry shortly"
                ) from None
            else:
                raise
        self._metrics.queue_wait.observe(time.monotonic() - t0)

    def release(self) -> None:
        with self._lock:
            waiter = self._waiters.popleft() if self._waiters else None
            if waiter is None:
                self.active = max(0, self.active - 1)
            else:
                waiter.granted = True  # the slot passes to the waiter: active stays the same
            self._gauges()
        if waiter is not None:
            try:
                waiter.loop.call_soon_threadsafe(_wake, waiter.future)
            except RuntimeError:  # its loop is closed: it will never take the slot, so pass it on
                self.release()


_ITEM, _END, _ERR = "item", "end", "error"


class Cancelled(Exception):
    """The request was cancelled (client gone, cancel message, or a protocol error)."""


class Bridge:
    """Runs a blocking generator in a worker thread and hands its items to the event loop.

    The worker may run at most ``depth`` items ahead of the consumer. ``produce`` gets the bridge's
    ``CancelToken``: ``cancel()`` cancels it, so synthesis stops at once, in the middle of a chunk, and
    the worker stops at its next step; the worker always closes the generator itself (a generator can
    only be closed from the thread running it), which frees the request's state. ``on_done`` (slot
    release) is called once: when the worker finishes, or at once on ``cancel`` (what is left of a
    cancelled request is short, and a client that left must not keep the next one waiting or make it
    get 429). ``stats`` counts the seconds the worker spent computing (excluding time
    blocked on a slow consumer and time spent waiting for text, which the text feed reports through
    ``waited``). ``timeout``: wall-clock seconds from ``start``; a ``get`` past it cancels the work and
    raises a 408 ``ApiError`` (so do all later ones).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        produce: Callable[[CancelToken], Iterator],
        on_done: Callable[[], None],
        depth: int,
        cancelled: threading.Event | None = None,
        timeout: float | None = None,
        after: Callable[[], None] | None = None,
    ) -> None:
        self._loop = loop
        self._produce = produce
        self._on_done = on_done
        self._after = after  # run by the worker when it has finished, last (memory trimming)
        self._q: asyncio.Queue = asyncio.Queue()
        self._room = threading.Semaphore(max(1, depth))
        self.cancelled = cancelled or threading.Event()
        self.token = CancelToken()
        self.finished = threading.Event()
        self.compute_seconds = 0.0
        self.waited = 0.0  # added to by the text feed (seconds blocked waiting for text)
        self.timeout = timeout
        self.deadline: float | None = None
        self._failed = asyncio.Event()
        self._failure: BaseException | None = None
        self._holding = False  # a started bridge holds its slot until _release
        self._release_lock = threading.Lock()

    def start(self, executor: ThreadPoolExecutor) -> None:
        if self.timeout is not None:
            self.deadline = time.monotonic() + self.timeout
        self._holding = True
        try:
            executor.submit(self._run)
        except BaseException:
            self.finished.set()
            self._release()
            raise

    def _release(self) -> None:
        with self._release_lock:
            if not self._holding:
                return
            self._holding = False
        self._on_done()

    def cancel(self) -> None:
        self.cancelled.set()
        self.token.cancel()
        self._release()

    def fail(self, exc: BaseException) -> None:
        """From the event loop: stop the worker and make the consumer's next ``get`` raise ``exc``."""
        self.cancel()
        self._q.put_nowait((_ERR, exc))
        if self._failure is None:
            self._failure = exc
            self._failed.set()

    async def failed(self) -> None:
        """Returns only by raising: what ``fail`` was first given, once it is called."""
        await self._failed.wait()
        assert self._failure is not None
        raise self._failure

    async def get(self) -> tuple[str, Any]:
        if self.deadline is None:
            kind, value = await self._q.get()
        else:
            try:
                kind, value = await _within(self._q.get(), self.deadline - time.monotonic())
            except TimeoutError:
                err = ApiError(
                    408,
                    "deadline_exceeded",
                    f"the request ran past the server's limit of {self.timeout:g} s; send shorter text",
                )
                self.fail(err)
                raise err from None
        if kind == _ITEM:
            self._room.release()
        elif kind == _ERR:
            self._q.put_nowait((kind, value))  # sticky: later gets see the error again
            raise value
        else:
            self._q.put_nowait((kind, value))
        return kind, value

    # -- worker thread ---------------------------------------------------------------------------

    def _post(self, msg: tuple[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self._loop.call_soon_threadsafe(self._q.put_nowait, msg)

    def _put_item(self, item: Any) -> bool:
        while not self._room.acquire(timeout=0.05):
            if self.cancelled.is_set():
                return False
        if self.cancelled.is_set():
            return False
        self._post((_ITEM, item))
        return True

    def _run(self) -> None:
        gen = None
        final: tuple[str, Any] | None = None
        try:
            if self.cancelled.is_set():
                return
            t = time.perf_counter()
            gen = self._produce(self.token)
            while True:
                try:
                    item = next(gen)
                except StopIteration:
                    self.compute_seconds += time.perf_counter() - t
                    break
                self.compute_seconds += time.perf_counter() - t
                if self.cancelled.is_set() or not self._put_item(item):
                    return
                t = time.perf_counter()
            final = (_END, None)
        except (Cancelled, SynthesisCancelled):
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which maps it to a response
            if not isinstance(e, InputError):
                log.exception("synthesis failed")
            final = (_ERR, e)
        finally:
            if gen is not None:
                with contextlib.suppress(Exception):
                    gen.close()
            self.finished.set()
            self._release()
            # Posted last, so a consumer that saw the end also sees the slot free again.
            if final is not None:
                self._post(final)
            if self._after is not None:
                with contextlib.suppress(Exception):
                    self._after()

    async def result(self) -> Any:
        """For one-item producers: the item, once the worker has finished and released its slot."""
        kind, item = await self.get()
        if kind == _END:
            raise RuntimeError("the producer yielded nothing")
        await self.get()  # the end
        return item


class TextFeed:
    """Text pieces from the event loop to the model's text iterator (read in the worker thread).

    Bounded by the request's character limit, which the loop checks before ``put``. When the request is
    cancelled the iterator raises ``Cancelled`` so the model stops waiting for text at once.
    """

    def __init__(self, bridge_cancelled: threading.Event) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = bridge_cancelled
        self.waited = 0.0
        self.first_text_at: float | None = None
        self.ended = False

    def put(self, text: str) -> None:
        if self.first_text_at is None:
            self.first_text_at = time.perf_counter()
        self._q.put(text)

    def end(self) -> None:
        self.ended = True
        self._q.put(None)

    def __iter__(self) -> Iterator[str]:
        while True:
            t = time.perf_counter()
            while True:
                try:
                    piece = self._q.get(timeout=0.05)
                    break
                except queue.Empty:
                    if self._cancelled.is_set():
                        raise Cancelled() from None
            self.waited += time.perf_counter() - t
            if piece is None:
                return
            yield piece


# ---------------------------------------------------------------------------------------------------
# Request schemas
# ---------------------------------------------------------------------------------------------------

AudioFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]
assert set(AudioFormat.__args__) == set(AUDIO_FORMATS)  # type: ignore[attr-defined]


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be used as request text (None: it can). A lone surrogate (JSON allows "\\ud800")
    has no UTF-8 form, so the tokenizer, SQLite and the log would all fail on it later."""
    if "\x00" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired surrogate (not valid Unicode text)"
    return None


def _valid_text(text: str) -> str:
    problem = text_problem(text)
    if problem:
        raise ValueError(problem)
    return text


def _valid_speed(value: object) -> float:
    """A finite number in OpenAI's range; checked before float() (float(10**400) raises OverflowError)."""
    lo, hi = OPENAI_MIN_SPEED, OPENAI_MAX_SPEED
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    if isinstance(value, int) and not -(10**6) < value < 10**6:
        raise ValueError(f"must be between {lo} and {hi}")
    speed = float(value)
    if not math.isfinite(speed) or not lo <= speed <= hi:
        raise ValueError(f"must be between {lo} and {hi}")
    return speed


Text = Annotated[StrictStr, AfterValidator(_valid_text)]
Speed = Annotated[float, BeforeValidator(_valid_speed)]


class VoiceObject(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: Text = Field(max_length=200)


class SpeechOptions(BaseModel):
    """Options shared by the OpenAI endpoint and the WebSocket start message. Every field is checked here,
    so a malformed value is a 400 with the field's name, never an error later on."""

    model_config = ConfigDict(extra="ignore")

    voice: Text | VoiceObject | None = Field(default=None)
    speed: Speed = 1.0
    instruct: Text | None = Field(default=None, max_length=1000)
    instructions: Text | None = Field(default=None, max_length=1000)  # OpenAI's name for it
    seed: StrictInt | None = Field(default=None, ge=-(2**63), lt=2**63)
    # our field: the LM starts without the voice's transcript (true) or after it (false); null: the model
    # decides (cosyvoice2.synthesis)
    cross_lingual: StrictBool | None = None

    def voice_key(self) -> str | None:
        v = self.voice
        key = v.id if isinstance(v, VoiceObject) else v
        if key is not None and len(key) > 200:
            raise ApiError(400, "invalid_request", "voice: at most 200 characters", param="voice")
        return key

    def instruction(self) -> str | None:
        text = self.instruct if self.instruct is not None else self.instructions
        return text if text and text.strip() else None

    def model_speed(self) -> float:
        """The request's speed (OpenAI's 0.25-4 range, checked by the schema) within the model's range."""
        lo, hi = _model_speed_range()
        return min(max(self.speed, lo), hi)


def _model_speed_range() -> tuple[float, float]:
    try:
        from cosyvoice2 import synthesis

        return float(synthesis.MIN_SPEED), float(synthesis.MAX_SPEED)
    except (ImportError, AttributeError):
        return 0.5, 2.0


class SpeechRequest(SpeechOptions):
    model: Text | None = Field(default=None, max_length=200)
    input: Text
    response_format: AudioFormat = "mp3"
    stream: StrictBool | None = None  # our field; None: stream (every format we make can stream)
    stream_format: Literal["audio"] | None = None  # OpenAI's "sse" is not supported


class StreamStart(SpeechOptions):
    type: Literal["start"]
    format: AudioFormat | None = None
    response_format: AudioFormat | None = None
    text: Text | None = None

    def audio_format(self) -> str:
        return self.format or self.response_format or "pcm"


# ---------------------------------------------------------------------------------------------------
# Middleware: API key and request metrics (plain ASGI, so both cover WebSockets too)
# ---------------------------------------------------------------------------------------------------


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _bearer(scope: dict) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            text = value.decode("latin-1").strip()
            if text[:7].lower() == "bearer ":
                return text[7:].strip()
    return None


def ws_key_protocol(api_key: str) -> str:
    """The WebSocket subprotocol that carries ``api_key`` (browsers cannot set headers on a WebSocket)."""
    return WS_KEY_PREFIX + base64.urlsafe_b64encode(api_key.encode()).decode().rstrip("=")


def _subprotocol_key(scope: dict) -> str | None:
    for proto in scope.get("subprotocols") or ():
        if proto.startswith(WS_KEY_PREFIX):
            b64 = proto[len(WS_KEY_PREFIX) :]
            try:
                return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).decode()
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return None
    return None


class AuthMiddleware:
    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    def _ok(self, scope: dict) -> bool:
        token = _bearer(scope)
        if token is None and scope["type"] == "websocket":
            token = _subprotocol_key(scope)
        return token is not None and hmac.compare_digest(token.encode(), self._key)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or _is_public(scope.get("path", "")):
            return await self.app(scope, receive, send)
        if scope["type"] == "http" and scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)  # CORS preflight carries no credentials
        if self._ok(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008, "reason": "invalid or missing API key"})
            return
        err = ApiError(
            401,
            "unauthorized",
            "invalid or missing API key (send 'Authorization: Bearer KEY')",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await err.response()(scope, receive, send)


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1").strip()
    return None


def _host_name(authority: str) -> str | None:
    """'Example.org:8000' -> 'example.org', '[::1]:8000' -> '::1'; None when it is not a host[:port]."""
    try:
        parts = urlsplit("//" + authority)
        host, _ = parts.hostname, parts.port  # .port raises ValueError for a bad port
    except ValueError:
        return None
    if not host or parts.username is not None or parts.path or parts.query or parts.fragment:
        return None
    return host.lower()


class HostOriginMiddleware:
    """Refuses (403) requests whose ``Host`` is not an allowed name, and browser requests whose ``Origin``
    is neither this server nor a configured CORS origin. Used when no API key is set: then a loopback
    server is otherwise open to any web page, through DNS rebinding (an attacker's name that resolves to
    127.0.0.1: the browser sends ``Host: attacker.example``) or a cross-site WebSocket, which CORS does not
    cover. Requests without ``Origin`` (curl, SDKs) only need an allowed ``Host``.
    """

    def __init__(self, app, allowed_hosts: list[str], cors_origins: list[str]) -> None:
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.hosts = {h.strip("[]").lower() for h in (*LOOPBACK_HOSTS, *allowed_hosts) if h != "*"}
        self.origins = {o.rstrip("/").lower() for o in cors_origins}

    def _problem(self, scope: dict) -> tuple[str, str] | None:
        host_header = _header(scope, b"host")
        host = _host_name(host_header) if host_header else None
        if host is None or not (self.any_host or host in self.hosts):
            return "forbidden_host", "this server does not answer to that Host name"
        origin = _header(scope, b"origin")
        if origin is None or origin.lower() in self.origins:
            return None
        parts = urlsplit(origin.lower())
        if parts.scheme in ("http", "https", "ws", "wss") and parts.netloc == host_header.lower():
            return None  # same origin: the page at / (or any page this server serves)
        return "forbidden_origin", "requests from this web origin are not allowed (see --cors-origin)"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        problem = self._problem(scope)
        if problem is None:
            return await self.app(scope, receive, send)
        code, message = problem
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
            return
        scope[ERROR_CODE_KEY] = code
        await ApiError(403, code, message).response()(scope, receive, send)


class MetricsMiddleware:
    """Counts HTTP requests by route template and status (WebSocket requests are counted by their route)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "other"
            self.metrics.requests.inc(route=path, status=str(status["code"]))
            if status["code"] >= 400:
                code = scope.get(ERROR_CODE_KEY) or _HTTP_CODES.get(
                    status["code"], "internal_error" if status["code"] >= 500 else "error"
                )
                self.metrics.errors.inc(route=path, code=code)


class ReplicaHeaderMiddleware:
    """Adds ``X-Replica: <id>`` to every HTTP response, so a client (or a test) behind a load balancer can
    tell which replica served it."""

    def __init__(self, app, replica_id: str) -> None:
        self.app = app
        self.header = (b"x-replica", replica_id.encode("latin-1", "replace"))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, send_wrapper)


# ---------------------------------------------------------------------------------------------------
# Body reading with limits
# ---------------------------------------------------------------------------------------------------


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _declared_length(request: Request, limit: int) -> None:
    """Refuse a body whose Content-Length is over ``limit`` before reading any of it."""
    length = request.headers.get("content-length")
    if length is None:
        return
    if not length.isdigit() or len(length) > 18:
        raise ApiError(400, "bad_request", "invalid Content-Length")
    n = int(length)
    if n > limit:
        raise ApiError(413, "payload_too_large", f"request body is {n} bytes, at most {limit} are accepted")


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, at most ``limit`` bytes (413) and within ``timeout`` seconds (408)."""
    _declared_length(request, limit)
    parts, size = [], 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "payload_too_large", f"request body is over {limit} bytes")
            parts.append(chunk)

    try:
        await _within(read(), timeout)
    except TimeoutError:
        raise ApiError(408, "timeout", f"the request body did not arrive within {timeout:g} s") from None
    except ClientDisconnect:
        raise _ClientGone() from None
    return b"".join(parts)


async def _read_json(request: Request, limit: int, timeout: float) -> Any:
    if _media_type(request) != "application/json":
        raise ApiError(
            415, "unsupported_media_type", "send the request as JSON (Content-Type: application/json)"
        )
    body = await _read_body(request, limit, timeout)
    return _parse_json(body, "request body")


def _parse_json(data: str | bytes, what: str) -> Any:
    """json.loads with every failure as a 400: syntax, bad UTF-8, nesting too deep, and integers too long
    to convert (Python refuses over 4300 digits with a plain ValueError)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ApiError(400, "invalid_json", f"{what} is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise ApiError(400, "invalid_json", f"{what} is not valid JSON: {str(e)[:200]}") from None


def _check_text(text: str, limit: int, what: str = "input") -> str:
    if len(text) > limit:
        raise ApiError(
            400,
            "input_too_long",
            f"{what} is {len(text)} characters, at most {limit} are allowed",
            param=what,
        )
    if not text.strip():
        raise ApiError(400, "invalid_request", f"{what} is empty", param=what)
    if "\x00" in text:
        raise ApiError(400, "invalid_request", f"{what} contains a NUL character", param=what)
    return text


# ---------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------


class MemoryTrim:
    """Hands freed heap memory back to the OS after requests (glibc ``malloc_trim``), at most once per
    ``interval`` seconds; a no-op elsewhere.

    A request allocates and frees many large tensors of varying sizes from several threads. glibc keeps
    freed memory in its arenas, and after a large block is freed it raises its mmap threshold, so later
    blocks of that size come from the arenas too: the server's RSS then creeps up request after request
    although nothing is held (measured with bench/soak.py). Trimming returns those free pages.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._last = -math.inf
        self._trim = _malloc_trim()

    def __call__(self) -> None:
        if self._trim is None:
            return
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.interval:
                return
            self._last = now
        self._trim(0)


def _malloc_trim() -> Callable[[int], int] | None:
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


class _Abort(Exception):
    """Ends a streaming response early: the connection is closed, so the client sees a truncated body."""


class _StreamResponse(StreamingResponse):
    """A streaming response that cancels its synthesis however it ends (done, error, client gone), and
    drops a client that leaves sent audio unread for ``stall_timeout`` seconds (it would otherwise hold
    its synthesis slot forever: the worker waits for buffer room, and the buffer waits for the client)."""

    def __init__(
        self,
        content,
        on_close: Callable[[], None],
        stall_timeout: float,
        on_stall: Callable[[], None] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close
        self._stall_timeout = stall_timeout
        self._on_stall = on_stall

    async def __call__(self, scope, receive, send) -> None:
        async def timed_send(message) -> None:
            try:
                await _within(send(message), self._stall_timeout)
            except TimeoutError:
                log.warning("dropped a client that read no audio for %g s", self._stall_timeout)
                if self._on_stall is not None:
                    self._on_stall()
                raise _Abort() from None

        try:
            await super().__call__(scope, receive, timed_send)
        except _Abort:
            pass  # returning without finishing the body makes the server close the connection
        except BaseException as e:
            if isinstance(e, BaseExceptionGroup) and all(isinstance(x, _Abort) for x in e.exceptions):
                return
            raise
        finally:
            self._on_close()


class _ClientGone(Exception):
    pass


async def _unless(work: Awaitable[T], gone: Awaitable[Any] | None) -> T:
    """Await ``work``, unless ``gone`` finishes first (the client left): then cancel ``work`` and raise
    ``_ClientGone`` (or what ``gone`` raised). ``work`` wins a tie."""
    if gone is None:
        return await work
    work_task, gone_task = asyncio.ensure_future(work), asyncio.ensure_future(gone)
    try:
        await asyncio.wait({work_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
        if work_task.done():
            return work_task.result()
        gone_task.result()
        raise _ClientGone()
    finally:
        for task in (work_task, gone_task):
            if not task.done():
                task.cancel()
        # Let a cancelled acquire hand back the slot it may have been given before going on.
        await asyncio.gather(work_task, gone_task, return_exceptions=True)


async def _disconnected(request: Request) -> None:
    """Returns when the HTTP client has gone away (call once the body has been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class Server:
    """State shared by the routes: the model, settings, voice store, slots, worker pool and metrics."""

    def __init__(self, tts, settings: Settings) -> None:
        self.tts = tts
        self.settings = settings
        self.sample_rate = int(tts.sample_rate)
        self.metrics = Metrics()
        self.slots = Slots(settings.max_active, settings.max_queue, self.metrics, settings.retry_after)
        # Slots bound the model work; the pool has room for all of it, and for as many cancelled requests
        # winding down (their slots are free already), so no accepted request waits here.
        self.executor = ThreadPoolExecutor(
            max_workers=2 * self.slots.n + 2, thread_name_prefix="cosyvoice2-synth"
        )
        self.store = open_voice_store(
            settings.resolved_data_dir(),
            settings.voice_db,
            settings.voice_files,
            namespace=settings.voice_namespace,
            cache_size=settings.voice_cache_size,
            shared=settings.shared_voices,
        )
        self.metrics.voices.set(self.store.count())
        self.started_at = time.time()
        try:
            self.builtin = list(tts.speakers())
        except Exception:  # noqa: BLE001
            self.builtin = []
        self.max_tokens = request_token_budget(tts, settings.max_request_mb)
        self.trim = MemoryTrim()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.store.close()

    # -- voices ----------------------------------------------------------------------------------

    def openai_alias(self, name: str) -> str | None:
        """The built-in speaker an OpenAI voice name stands for (None: the default voice)."""
        if not self.builtin:
            return None
        return self.builtin[OPENAI_VOICES.index(name) % len(self.builtin)]

    def aliases(self, saved: dict[str, str]) -> dict[str, str]:
        """What each OpenAI voice name resolves to now: a saved voice id (a saved voice with that name wins),
        a built-in speaker, or "default"."""
        out = {}
        for name in OPENAI_VOICES:
            out[name] = saved.get(name) or self.openai_alias(name) or "default"
        return out

    def resolve_voice(self, key: str | None):
        """A request's voice -> what ``tts`` takes: a VoiceReference, a built-in name, or None. Blocking."""
        if key is None or key.strip().lower() in DEFAULT_VOICE_NAMES:
            return None
        info = self.store.find(key)
        if info is not None:
            cached = self.store.is_cached(info.id)
            try:
                voice = self.store.load(info.id)
            except VoiceNotFound:
                voice = None
            if voice is not None:
                self.metrics.voice_cache.inc(result="hit" if cached else "miss")
                return voice
        if key in self.builtin:
            return key
        if key.lower() in OPENAI_VOICES:
            return self.openai_alias(key.lower())
        raise ApiError(
            400,
            "voice_not_found",
            f"unknown voice {key[:80]!r}: use a saved voice id or name (GET /v1/voices), a built-in speaker, "
            f"an OpenAI voice name ({', '.join(OPENAI_VOICES[:4])}, ...) or 'default'",
            param="voice",
        )

    # -- synthesis -------------------------------------------------------------------------------

    async def admit(self, gone: Callable[[], Awaitable[Any]] | None = None) -> None:
        """Take a synthesis slot, waiting in the queue if need be (429 when it is full or the wait is too
        long); ``gone()`` finishing (the client left) cancels the wait with ``_ClientGone``. The caller
        hands the slot to a bridge (``start_bridge(..., admitted=True)``) or gives it back
        (``slots.release()``)."""
        await _unless(self.slots.acquire(self.settings.queue_timeout), gone() if gone else None)

    def new_bridge(
        self, produce: Callable[[CancelToken], Iterator], cancelled: threading.Event | None = None
    ) -> Bridge:
        """A bridge for ``produce``, not started yet (``launch``)."""
        return Bridge(
            asyncio.get_running_loop(),
            produce,
            self.slots.release,
            self.settings.buffer_chunks,
            cancelled,
            timeout=self.settings.request_timeout,
            after=self.trim,
        )

    async def launch(
        self, bridge: Bridge, *, gone: Callable[[], Awaitable[Any]] | None = None, admitted: bool = False
    ) -> Bridge:
        """Take a slot (``admit``, unless already ``admitted``) and start ``bridge``'s worker, which gives
        the slot back when it is done. The request's wall-clock limit starts now."""
        if not admitted:
            await self.admit(gone)
        bridge.start(self.executor)
        return bridge

    async def start_bridge(
        self,
        produce: Callable[[CancelToken], Iterator],
        cancelled: threading.Event | None = None,
        *,
        gone: Callable[[], Awaitable[Any]] | None = None,
        admitted: bool = False,
    ) -> Bridge:
        """``new_bridge`` + ``launch``."""
        return await self.launch(self.new_bridge(produce, cancelled), gone=gone, admitted=admitted)

    def encoded_stream(
        self, text, voice, fmt: str, opts: SpeechOptions, speed: float
    ) -> Callable[[CancelToken], Iterator]:
        """A producer of (bytes, n_samples) pairs: the request's audio encoded as it is made."""
        tts, sample_rate = self.tts, self.sample_rate

        def produce(cancel: CancelToken) -> Iterator[tuple[bytes, int]]:
            encoder = AudioStreamEncoder(fmt, sample_rate)
            gen = tts.stream(
                text,
                voice=voice,
                instruct=opts.instruction(),
                speed=speed,
                seed=opts.seed,
                cancel=cancel,
                max_tokens=self.max_tokens,
                cross_lingual=opts.cross_lingual,
            )
            try:
                for chunk in gen:
                    yield encoder.encode(chunk), int(np.asarray(chunk).size)
                yield encoder.close(), 0
            finally:
                gen.close()

        return produce


def request_token_budget(tts, max_request_mb: float) -> int | None:
    """Speech tokens whose flow state fits in ``max_request_mb`` (``Flow.stream_bytes_per_frame``; the
    prompt's part is shared between the requests of a voice, so it is not counted). None: not known."""
    try:
        flow = tts.models.flow
        dtype = getattr(getattr(tts.engine, "options", None), "flow_cache_dtype", None)
        per_frame = flow.stream_bytes_per_frame(dtype) if dtype is not None else flow.stream_bytes_per_frame()
    except Exception:  # noqa: BLE001 - a stand-in model without a flow: no budget
        return None
    return max(1, int(max_request_mb * 2**20 / (float(per_frame) * RATES.token_mel_ratio)))


def create_app(tts, settings: Settings | None = None) -> FastAPI:
    """The FastAPI app serving ``tts`` (a loaded ``cosyvoice2`` model) with ``settings``."""
    settings = settings or Settings()
    server = Server(tts, settings)
    metrics = server.metrics

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.close()

    app = FastAPI(
        title="cosyvoice2",
        version=_version(),
        lifespan=lifespan,
        docs_url="/docs" if settings.api_key is None else None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.api_key is None else None,
    )
    app.state.server = server

    # -- error handlers ----------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        request.scope[ERROR_CODE_KEY] = exc.code  # for the errors metric
        return exc.response()

    async def _mapped_error(request: Request, exc: Exception) -> JSONResponse:
        # (for _ClientGone nobody reads the response; its status and code are for the metrics)
        err = _as_api_error(exc)
        request.scope[ERROR_CODE_KEY] = err.code
        return err.response()

    for exc_type in (InputError, StorageUnavailable, _ClientGone):
        app.add_exception_handler(exc_type, _mapped_error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return ApiError(400, "invalid_request", message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return ApiError(exc.status_code, code, message, headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return ApiError(500, "internal_error", "internal server error").response()

    # -- page, health, metrics, models ---------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "model": settings.model_name,
            "sample_rate": server.sample_rate,
            "formats": list(AUDIO_FORMATS),
            "active": server.slots.active,
            "max_active": server.slots.n,
            "queued": server.slots.queued,
            "max_queue": server.slots.max_queue,
            "auth": settings.api_key is not None,
            "uptime_seconds": round(time.time() - server.started_at, 1),
            "replica": settings.replica_id,
        }

    @app.get("/metrics", include_in_schema=False)
    async def metrics_route() -> Response:
        with contextlib.suppress(StorageUnavailable):  # other servers may have changed a shared library
            metrics.voices.set(await asyncio.to_thread(server.store.count))
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        created = int(server.started_at)
        ids = [settings.model_name, "tts-1", "tts-1-hd", "gpt-4o-mini-tts"]
        return {
            "object": "list",
            "data": [{"id": i, "object": "model", "created": created, "owned_by": "cosyvoice2"} for i in ids],
        }

    # -- OpenAI speech -----------------------------------------------------------------------------

    @app.post("/v1/audio/speech")
    async def speech(request: Request) -> Response:
        route = "/v1/audio/speech"
        payload = await _read_json(request, settings.max_json_bytes, settings.body_timeout)
        if not isinstance(payload, dict):
            raise ApiError(400, "invalid_request", "the request body must be a JSON object")
        try:
            req = SpeechRequest.model_validate(payload)
        except PydanticValidationError as e:
            raise _as_api_error(e) from None
        text = _check_text(req.input, settings.max_input_chars)
        speed = req.model_speed()
        voice = await asyncio.to_thread(server.resolve_voice, req.voice_key())
        fmt = req.response_format
        request_id = "req_" + secrets.token_hex(8)
        headers = {
            "X-Request-Id": request_id,
            "X-Sample-Rate": str(server.sample_rate),
            "Cache-Control": "no-store",
        }
        t0 = time.perf_counter()

        def gone() -> Awaitable[None]:
            return _disconnected(request)

        if req.stream is False:
            produce = _offline(server, text, voice, fmt, req, speed)
            bridge = await server.start_bridge(produce, gone=gone)
            try:  # the synthesis stops as soon as the client goes away
                data, n = await _unless(bridge.result(), gone())
            except BaseException as e:
                bridge.cancel()
                if isinstance(e, asyncio.CancelledError):
                    raise
                raise _as_api_error(e) from None
            elapsed = time.perf_counter() - t0
            _observe(metrics, route, n / server.sample_rate, bridge.compute_seconds, None)
            headers["X-Audio-Seconds"] = f"{n / server.sample_rate:.3f}"
            headers["X-RTF"] = f"{elapsed / max(n / server.sample_rate, 1e-9):.3f}"
            return Response(data, media_type=content_type(fmt), headers=headers)

        bridge = await server.start_bridge(server.encoded_stream(text, voice, fmt, req, speed), gone=gone)
        first: list[bytes] = []
        samples = 0
        try:  # wait for the first audio bytes, so request errors still get a proper status code
            while True:
                kind, item = await _unless(bridge.get(), gone())
                if kind == _END:
                    break
                data, n = item
                samples += n
                if data:
                    first.append(data)
                    break
        except BaseException as e:
            bridge.cancel()
            if isinstance(e, asyncio.CancelledError):
                raise
            raise _as_api_error(e) from None
        first_latency = time.perf_counter() - t0
        metrics.first_packet.observe(first_latency, route=route)
        metrics.active_streams.inc()

        async def body():
            nonlocal samples
            try:
                for data in first:
                    yield data
                while True:
                    kind, item = await bridge.get()
                    if kind == _END:
                        break
                    data, n = item
                    samples += n
                    if data:
                        yield data
                _observe(metrics, route, samples / server.sample_rate, bridge.compute_seconds, None)
            except (Cancelled, asyncio.CancelledError, GeneratorExit):
                raise
            except BaseException as e:  # noqa: BLE001 - the status is sent: all we can do is cut the body
                err = _as_api_error(e)
                metrics.errors.inc(route=route, code=err.code)
                log.warning("speech stream %s failed after it started: %s", request_id, err.message)
                raise _Abort() from None

        def on_close() -> None:
            bridge.cancel()
            metrics.active_streams.dec()

        return _StreamResponse(
            body(),
            on_close=on_close,
            stall_timeout=settings.stall_timeout,
            on_stall=lambda: metrics.errors.inc(route=route, code="stalled"),
            media_type=content_type(fmt),
            headers=headers,
        )

    # -- voices --------------------------------------------------------------------------------------

    @app.post("/v1/voices", status_code=201)
    async def create_voice(request: Request) -> JSONResponse:
        if _media_type(request) != "multipart/form-data":
            raise ApiError(
                415,
                "unsupported_media_type",
                "upload the voice as multipart/form-data (fields audio, text, name)",
            )
        limit = settings.max_upload_bytes + 64 * 1024  # the audio plus the form's other fields
        _declared_length(request, limit)
        # The slot comes first: no more uploads are read into memory at once than requests are admitted.
        try:
            await server.admit()
        except ApiError:
            await _drain(request, limit, timeout=5.0)  # so the client reads the 429, not a reset
            raise
        try:
            data, text, name = await _read_voice_upload(request, settings, limit)
        except BaseException:
            server.slots.release()
            raise

        tts = server.tts

        def make(cancel: CancelToken) -> Iterator[Any]:  # voice cloning is short: not cancelled midway
            if server.store.name_taken(name):  # before the work; the database's constraint has the last word
                raise NameTaken(f"a saved voice is already named {name!r}")
            # The decoders stop past MAX_PROMPT_SECONDS whatever the file's header claims.
            voice = tts.voice(data, text=text, name=name)
            if voice.duration and voice.duration > settings.max_voice_seconds:
                raise InputError(
                    f"the audio is too long: {voice.duration:.2f} s, "
                    f"at most {settings.max_voice_seconds:g} s is allowed"
                )
            if voice.duration and voice.duration < settings.min_voice_seconds:
                raise InputError(
                    f"the audio is too short: at least {settings.min_voice_seconds:g} s is required"
                )
            yield server.store.add(voice, name)

        bridge = await server.start_bridge(make, admitted=True)
        try:
            info = await _unless(bridge.result(), _disconnected(request))
        except BaseException as e:
            bridge.cancel()
            if isinstance(e, asyncio.CancelledError):
                raise
            raise _as_api_error(e) from None
        metrics.voices.set(server.store.count())
        return JSONResponse(info.to_json(), status_code=201)

    @app.get("/v1/voices")
    async def list_voices() -> dict:
        infos = await asyncio.to_thread(server.store.list)
        by_name = {i.name: i.id for i in infos if i.name}  # newest last, so the newest wins
        return {
            "object": "list",
            "data": [i.to_json() for i in infos],
            "builtin": server.builtin,
            "openai_aliases": server.aliases(by_name),
        }

    @app.get("/v1/voices/{voice_id}")
    async def get_voice(voice_id: str) -> dict:
        try:
            info = await asyncio.to_thread(server.store.get, voice_id)
        except VoiceNotFound:
            raise ApiError(404, "voice_not_found", "no saved voice with this id") from None
        return info.to_json()

    @app.delete("/v1/voices/{voice_id}")
    async def delete_voice(voice_id: str) -> dict:
        try:
            info = await asyncio.to_thread(server.store.delete, voice_id)
        except VoiceNotFound:
            raise ApiError(404, "voice_not_found", "no saved voice with this id") from None
        metrics.voices.set(server.store.count())
        return {"id": info.id, "object": "voice", "deleted": True}

    # -- WebSocket streaming -------------------------------------------------------------------------

    @app.websocket(WS_ROUTE)
    async def speech_stream(ws: WebSocket) -> None:
        await _ws_session(ws, server)

    # -- static files, middleware ------------------------------------------------------------------------

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # add_middleware wraps the app: the last one added is the outermost (metrics, then Host/Origin or
    # CORS, then auth).
    if settings.api_key:
        app.add_middleware(AuthMiddleware, api_key=settings.api_key)
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["X-Request-Id", "X-Sample-Rate", "Retry-After"],
        )
    if not settings.api_key:
        app.add_middleware(
            HostOriginMiddleware,
            allowed_hosts=list(settings.allowed_hosts),
            cors_origins=list(settings.cors_origins),
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if settings.replica_id:
        app.add_middleware(ReplicaHeaderMiddleware, replica_id=settings.replica_id)
    return app


def _version() -> str:
    try:
        from cosyvoice2 import __version__

        return __version__
    except ImportError:
        return "0"


def _observe(metrics: Metrics, route: str, audio_seconds: float, compute: float, first: float | None) -> None:
    metrics.audio_seconds.inc(audio_seconds, route=route)
    if audio_seconds > 0:
        metrics.rtf.observe(compute / audio_seconds, route=route)
    if first is not None:
        metrics.first_packet.observe(first, route=route)


def _offline(server: Server, text: str, voice, fmt: str, opts: SpeechOptions, speed: float):
    tts, sample_rate = server.tts, server.sample_rate

    def produce(cancel: CancelToken) -> Iterator[tuple[bytes, int]]:
        audio = tts.synthesize(
            text,
            voice=voice,
            instruct=opts.instruction(),
            speed=speed,
            seed=opts.seed,
            cancel=cancel,
            max_tokens=server.max_tokens,
            cross_lingual=opts.cross_lingual,
        )
        yield encode_audio(audio, sample_rate, fmt), int(np.asarray(audio).size)

    return produce


_AUDIO_LIKE = {"application/octet-stream", "video/webm", "video/mp4", "video/ogg", "application/ogg"}


def _audio_content_type(ctype: str) -> bool:
    return ctype.startswith("audio/") or ctype in _AUDIO_LIKE


async def _drain(request: Request, limit: int, timeout: float) -> None:
    """Read and drop the rest of a body we will not use (best effort, bounded in bytes and time)."""
    size = 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return

    with contextlib.suppress(Exception):
        await _within(read(), timeout)


async def _read_voice_upload(
    request: Request, settings: Settings, limit: int
) -> tuple[bytes, str | None, str | None]:
    """(audio bytes, transcript, name) of a multipart voice upload, parsed as it arrives.

    The body is counted as it comes in (413 past ``limit``) and must arrive within ``body_timeout``. The
    parser spools a file part over 1 MB to a temporary file, so the audio is held in memory once, by the
    bytes this returns."""
    received = 0

    async def receive() -> dict:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise ApiError(413, "payload_too_large", f"request body is over {limit} bytes")
        return message

    counted = Request(request.scope, receive)
    try:
        form = await _within(
            counted.form(max_files=1, max_fields=8, max_part_size=64 * 1024), settings.body_timeout
        )
    except TimeoutError:
        raise ApiError(
            408, "timeout", f"the upload did not arrive within {settings.body_timeout:g} s"
        ) from None
    except (ApiError, _ClientGone):
        raise
    except ClientDisconnect:
        raise _ClientGone() from None
    except Exception as e:  # noqa: BLE001 - MultiPartException / HTTPException(400) / decode errors
        detail = getattr(e, "detail", None) or getattr(e, "message", None) or str(e) or "malformed form data"
        raise ApiError(400, "invalid_multipart", f"could not parse the upload: {detail}") from None
    try:
        upload = form.get("audio") or form.get("file")
        if upload is None or isinstance(upload, str) or not hasattr(upload, "read"):
            raise ApiError(
                400, "invalid_request", "the 'audio' field must be an uploaded audio file", param="audio"
            )
        ctype = (upload.content_type or "").split(";")[0].strip().lower()
        if ctype and not _audio_content_type(ctype):
            raise ApiError(
                415, "unsupported_media_type", f"the uploaded file is {ctype!r}, not audio", param="audio"
            )
        if upload.size is not None and upload.size > settings.max_upload_bytes:
            raise ApiError(413, "payload_too_large", f"audio is over {settings.max_upload_bytes} bytes")
        data = await upload.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise ApiError(413, "payload_too_large", f"audio is over {settings.max_upload_bytes} bytes")
        if not data:
            raise ApiError(400, "invalid_request", "the uploaded audio is empty", param="audio")
        text = _form_text(form, "text", MAX_TRANSCRIPT_CHARS)
        name = clean_name(_form_text(form, "name", 200))
    finally:
        await form.close()
    return data, text, name


def _form_text(form, key: str, limit: int) -> str | None:
    value = form.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(400, "invalid_request", f"'{key}' must be a text field, not a file", param=key)
    value = value.strip()
    if len(value) > limit:
        raise ApiError(400, "invalid_request", f"'{key}' is too long (at most {limit} characters)", param=key)
    problem = text_problem(value)
    if problem:
        raise ApiError(400, "invalid_request", f"'{key}' {problem}", param=key)
    return value or None


# ---------------------------------------------------------------------------------------------------
# WebSocket session
# ---------------------------------------------------------------------------------------------------


async def _ws_send_error(ws: WebSocket, err: ApiError, close_code: int, timeout: float) -> None:
    with contextlib.suppress(Exception):
        if ws.application_state == WebSocketState.CONNECTED:
            await _within(ws.send_json({"type": "error", **err.body()}), timeout)
            await _within(ws.close(close_code, err.message[:120]), timeout)


def _ws_message_json(msg: dict) -> dict:
    text = msg.get("text")
    if text is None:
        raise ApiError(400, "invalid_message", "send JSON text messages, not binary ones")
    data = _parse_json(text, "message")
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ApiError(400, "invalid_message", 'each message must be a JSON object with a "type"')
    return data


class _Stalled(Exception):
    """The WebSocket client read no audio for ``stall_timeout`` seconds."""


async def _ws_session(ws: WebSocket, server: Server) -> None:
    settings, metrics = server.settings, server.metrics
    route = WS_ROUTE
    status = "ok"
    asked = ws.scope.get("subprotocols") or ()
    await ws.accept(subprotocol=WS_SUBPROTOCOL if WS_SUBPROTOCOL in asked else None)
    bridge: Bridge | None = None
    receiver: asyncio.Task | None = None
    streaming = False
    try:
        try:
            msg = await _within(ws.receive(), settings.ws_start_timeout)
        except TimeoutError:
            raise ApiError(
                408, "timeout", f"no start message within {settings.ws_start_timeout:g} s"
            ) from None
        if msg["type"] == "websocket.disconnect":
            raise _ClientGone()
        start_msg = _ws_message_json(msg)
        if start_msg["type"] != "start":
            raise ApiError(400, "invalid_message", 'the first message must be {"type": "start", ...}')
        try:
            start = StreamStart.model_validate(start_msg)
        except PydanticValidationError as e:
            raise _as_api_error(e) from None
        fmt = start.audio_format()
        speed = start.model_speed()
        if start.text is not None and len(start.text) > settings.max_message_chars:
            raise ApiError(
                400,
                "input_too_long",
                f"a text message may hold at most {settings.max_message_chars} characters",
            )
        voice = await asyncio.to_thread(server.resolve_voice, start.voice_key())

        cancelled = threading.Event()  # shared by the feed and the bridge
        feed = TextFeed(cancelled)
        request_id = "req_" + secrets.token_hex(8)
        if start.text:
            feed.put(start.text)
        bridge = server.new_bridge(server.encoded_stream(iter(feed), voice, fmt, start, speed), cancelled)
        # The receiver runs while the request waits for a slot too: text sent meanwhile is kept, and a
        # client that leaves, cancels or breaks the protocol while queued is noticed at once.
        receiver = asyncio.create_task(_ws_receive(ws, feed, bridge, settings, len(start.text or "")))
        await server.launch(bridge, gone=bridge.failed)
        t_start = time.perf_counter()
        await ws.send_json(
            {
                "type": "started",
                "request_id": request_id,
                "format": fmt,
                "content_type": content_type(fmt),
                "sample_rate": server.sample_rate,
            }
        )
        metrics.active_streams.inc()
        streaming = True

        first_at: float | None = None
        samples = sent_bytes = chunks = 0
        while True:
            kind, item = await bridge.get()
            if kind == _END:
                break
            data, n = item
            samples += n
            if data:
                if first_at is None:
                    first_at = time.perf_counter()
                try:
                    await _within(ws.send_bytes(data), settings.stall_timeout)
                except TimeoutError:
                    raise _Stalled() from None
                sent_bytes += len(data)
                chunks += 1
        t_end = time.perf_counter()
        audio_seconds = samples / server.sample_rate
        origin = feed.first_text_at or t_start
        first_latency = None if first_at is None else max(0.0, first_at - origin)
        compute = max(0.0, bridge.compute_seconds - feed.waited)
        _observe(metrics, route, audio_seconds, compute, first_latency)
        await _within(
            ws.send_json(
                {
                    "type": "done",
                    "request_id": request_id,
                    "first_packet_latency_ms": None
                    if first_latency is None
                    else round(first_latency * 1000, 1),
                    "audio_seconds": round(audio_seconds, 3),
                    "compute_seconds": round(compute, 3),
                    "elapsed_seconds": round(t_end - origin, 3),
                    "rtf": round(compute / audio_seconds, 4) if audio_seconds > 0 else None,
                    "bytes": sent_bytes,
                    "chunks": chunks,
                    "sample_rate": server.sample_rate,
                }
            ),
            settings.stall_timeout,
        )
        with contextlib.suppress(Exception):
            await _within(ws.close(1000), settings.stall_timeout)
    except Cancelled:  # the client sent "cancel"
        status = "cancelled"
        with contextlib.suppress(Exception):
            await _within(ws.send_json({"type": "cancelled"}), settings.stall_timeout)
            await _within(ws.close(1000), settings.stall_timeout)
    except (_ClientGone, WebSocketDisconnect):
        status = "client_closed"
    except (_Stalled, TimeoutError):
        status = "stalled"
        metrics.errors.inc(route=route, code="stalled")
        log.warning("dropped a WebSocket client that read no audio for %g s", settings.stall_timeout)
    except BaseException as e:
        if isinstance(e, asyncio.CancelledError):
            status = "cancelled"
            raise
        err = _as_api_error(e)
        if err.status >= 500:
            log.error("websocket request failed: %r", e)
        status = err.code
        metrics.errors.inc(route=route, code=err.code)
        close_code = 1013 if err.status in (429, 503) else (1011 if err.status >= 500 else 1008)
        await _ws_send_error(ws, err, close_code, settings.stall_timeout)
    finally:
        if bridge is not None:
            bridge.cancel()
        if receiver is not None:
            receiver.cancel()
            with contextlib.suppress(BaseException):
                await receiver
        if streaming:
            metrics.active_streams.dec()
        metrics.requests.inc(route=route, status=status)


async def _ws_receive(ws: WebSocket, feed: TextFeed, bridge: Bridge, settings: Settings, total: int) -> None:
    """Read the client's messages while the request runs: text pieces, end, cancel, or disconnect.

    The idle limit counts from the last piece that carried text, so a client cannot keep a request (and
    its slot) alive forever with empty pieces."""
    last_text = time.monotonic()
    try:
        while True:
            timeout = None if feed.ended else last_text + settings.ws_idle_timeout - time.monotonic()
            try:
                msg = await _within(ws.receive(), timeout)
            except TimeoutError:
                raise ApiError(
                    408, "timeout", f"no text for {settings.ws_idle_timeout:g} s; send 'end' when done"
                ) from None
            if msg["type"] == "websocket.disconnect":
                raise _ClientGone()
            data = _ws_message_json(msg)
            kind = data["type"]
            if kind == "text":
                if feed.ended:
                    raise ApiError(400, "invalid_message", "text after end")
                piece = data.get("text")
                if not isinstance(piece, str):
                    raise ApiError(400, "invalid_message", '"text" must be a string')
                if len(piece) > settings.max_message_chars:
                    raise ApiError(
                        400,
                        "input_too_long",
                        f"a text message may hold at most {settings.max_message_chars} characters",
                    )
                problem = text_problem(piece)
                if problem:
                    raise ApiError(400, "invalid_message", f"text {problem}")
                total += len(piece)
                if total > settings.max_stream_chars:
                    raise ApiError(
                        400,
                        "input_too_long",
                        f"the streamed text is over {settings.max_stream_chars} characters",
                    )
                if piece.strip():
                    last_text = time.monotonic()
                if piece:
                    feed.put(piece)
            elif kind == "end":
                if not feed.ended:
                    feed.end()
            elif kind == "cancel":
                raise Cancelled()
            else:
                raise ApiError(
                    400, "invalid_message", f"unknown message type {kind[:40]!r} (text, end, cancel)"
                )
    except asyncio.CancelledError:
        raise
    except BaseException as e:  # noqa: BLE001 - handed to the sender loop
        bridge.fail(e)
