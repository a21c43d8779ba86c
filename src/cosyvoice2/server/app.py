"""The HTTP/WebSocket server: an OpenAI-compatible speech API, streaming both ways, and a voice library.

``create_app(tts, settings)`` builds the FastAPI app around one loaded model. Routes:

=========================================  ============================================================
``POST /v1/audio/speech``                  OpenAI schema (+ ``instruct``, ``seed``, ``stream``); audio is
                                           streamed as it is made unless ``stream`` is false
``WS   /v1/audio/speech/stream``           text pieces in, audio frames out (protocol below)
``POST /v1/voices``                        multipart ``audio`` (+ ``text``, ``name``) -> saved voice
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
requests hold a synthesis slot; one more gets ``429`` with ``Retry-After`` (nothing is queued). A worker
hands audio to the event loop through a small bounded buffer, so a slow client slows its own synthesis
instead of piling up memory, and a client that goes away closes the request's generator at once.

WebSocket protocol (``/v1/audio/speech/stream``; JSON text frames from the client, one request per
connection)::

    -> {"type": "start", "voice": "alloy", "format": "pcm", "instruct": null, "speed": 1.0, "seed": null,
        "text": "optional first piece"}
    <- {"type": "started", "request_id": "...", "format": "pcm", "content_type": "audio/pcm",
        "sample_rate": 24000}
    -> {"type": "text", "text": "Hello "}            (any number, as an LLM writes them)
    -> {"type": "end"}                               (no more text; "cancel" stops at once)
    <- binary frames: the audio, encoded in "format" (pcm: s16le mono at sample_rate)
    <- {"type": "done", "request_id": ..., "first_packet_latency_ms": ..., "audio_seconds": ...,
        "compute_seconds": ..., "elapsed_seconds": ..., "rtf": ..., "bytes": ..., "chunks": ...}
    <- {"type": "error", "error": {"code": ..., "message": ...}}   (instead of "done"), then close

With an API key configured, WebSocket clients send ``Authorization: Bearer KEY`` or, from a browser
(which cannot set headers on a WebSocket), ``?api_key=KEY`` in the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs

import numpy as np
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic import ValidationError as PydanticValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocketDisconnect, WebSocketState

from cosyvoice2.audio import AUDIO_FORMATS, AudioStreamEncoder, content_type, encode_audio
from cosyvoice2.errors import InputError
from cosyvoice2.synthesis import Cancelled as SynthesisCancelled
from cosyvoice2.synthesis import CancelToken

from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .voices import MAX_TRANSCRIPT_CHARS, VoiceNotFound, VoiceStore, clean_name

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
PUBLIC_PATHS = ("/", "/health", "/favicon.ico")
PUBLIC_PREFIXES = ("/static/",)
ERROR_CODE_KEY = "cosyvoice2.error_code"  # set in the ASGI scope by the error handlers


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "cosyvoice2"


@dataclass
class Settings:
    """Server limits and options. ``data_dir`` None: $XDG_DATA_HOME/cosyvoice2 (~/.local/share/...)."""

    data_dir: str | Path | None = None
    api_key: str | None = None
    max_active: int = 2  # synthesis slots (requests doing model work at once); more get 429
    cors_origins: list[str] = field(default_factory=list)
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
    if isinstance(exc, InputError):
        return ApiError(400, "invalid_request", str(exc))
    if isinstance(exc, PydanticValidationError):
        message, param = _validation_message(exc)
        return ApiError(400, "invalid_request", message, param=param)
    return ApiError(500, "internal_error", "internal server error")


# ---------------------------------------------------------------------------------------------------
# Concurrency: synthesis slots and the worker -> event loop bridge
# ---------------------------------------------------------------------------------------------------


class Slots:
    """A non-blocking counting limit (no queue): ``try_acquire`` either takes a slot or says no."""

    def __init__(self, n: int, metrics: Metrics) -> None:
        self.n = max(1, int(n))
        self.active = 0
        self._lock = threading.Lock()
        self._metrics = metrics
        metrics.max_active.set(self.n)

    def try_acquire(self) -> bool:
        with self._lock:
            if self.active >= self.n:
                return False
            self.active += 1
            self._metrics.active.set(self.active)
            return True

    def release(self) -> None:
        with self._lock:
            self.active = max(0, self.active - 1)
            self._metrics.active.set(self.active)


_ITEM, _END, _ERR = "item", "end", "error"


class Cancelled(Exception):
    """The request was cancelled (client gone, cancel message, or a protocol error)."""


class Bridge:
    """Runs a blocking generator in a worker thread and hands its items to the event loop.

    The worker may run at most ``depth`` items ahead of the consumer. ``produce`` gets the bridge's
    ``CancelToken``: ``cancel()`` cancels it, so synthesis stops at once, in the middle of a chunk, and
    the worker stops at its next step; the worker always closes the generator itself (a generator can
    only be closed from the thread running it), which frees the request's state, and then calls
    ``on_done`` (slot release). ``stats`` counts the seconds the worker spent computing (excluding time
    blocked on a slow consumer and time spent waiting for text, which the text feed reports through
    ``waited``).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        produce: Callable[[CancelToken], Iterator],
        on_done: Callable[[], None],
        depth: int,
        cancelled: threading.Event | None = None,
    ) -> None:
        self._loop = loop
        self._produce = produce
        self._on_done = on_done
        self._q: asyncio.Queue = asyncio.Queue()
        self._room = threading.Semaphore(max(1, depth))
        self.cancelled = cancelled or threading.Event()
        self.token = CancelToken()
        self.finished = threading.Event()
        self.compute_seconds = 0.0
        self.waited = 0.0  # added to by the text feed (seconds blocked waiting for text)

    def start(self, executor: ThreadPoolExecutor) -> None:
        try:
            executor.submit(self._run)
        except BaseException:
            self.finished.set()
            self._on_done()
            raise

    def cancel(self) -> None:
        self.cancelled.set()
        self.token.cancel()

    def fail(self, exc: BaseException) -> None:
        """From the event loop: stop the worker and make the consumer's next ``get`` raise ``exc``."""
        self.cancel()
        self._q.put_nowait((_ERR, exc))

    async def get(self) -> tuple[str, Any]:
        kind, value = await self._q.get()
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
            self._on_done()
            # Posted last, so a consumer that saw the end also sees the slot free again.
            if final is not None:
                self._post(final)

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


class VoiceObject(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: StrictStr = Field(max_length=200)


class SpeechOptions(BaseModel):
    """Options shared by the OpenAI endpoint and the WebSocket start message."""

    model_config = ConfigDict(extra="ignore")

    voice: StrictStr | VoiceObject | None = Field(default=None)
    speed: StrictFloat | StrictInt = 1.0
    instruct: StrictStr | None = Field(default=None, max_length=1000)
    instructions: StrictStr | None = Field(default=None, max_length=1000)  # OpenAI's name for it
    seed: StrictInt | None = Field(default=None, ge=-(2**63), lt=2**63)

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
        speed = float(self.speed)
        if not (OPENAI_MIN_SPEED <= speed <= OPENAI_MAX_SPEED) or not np.isfinite(speed):
            raise ApiError(
                400,
                "invalid_request",
                f"speed must be between {OPENAI_MIN_SPEED} and {OPENAI_MAX_SPEED}, got {speed}",
                param="speed",
            )
        lo, hi = _model_speed_range()
        return min(max(speed, lo), hi)


def _model_speed_range() -> tuple[float, float]:
    try:
        from cosyvoice2 import synthesis

        return float(synthesis.MIN_SPEED), float(synthesis.MAX_SPEED)
    except (ImportError, AttributeError):
        return 0.5, 2.0


class SpeechRequest(SpeechOptions):
    model: StrictStr | None = Field(default=None, max_length=200)
    input: StrictStr
    response_format: AudioFormat = "mp3"
    stream: StrictBool | None = None  # our field; None: stream (every format we make can stream)
    stream_format: Literal["audio"] | None = None  # OpenAI's "sse" is not supported


class StreamStart(SpeechOptions):
    type: Literal["start"]
    format: AudioFormat | None = None
    response_format: AudioFormat | None = None
    text: StrictStr | None = None

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


class AuthMiddleware:
    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    def _ok(self, scope: dict) -> bool:
        token = _bearer(scope)
        if token is None and scope["type"] == "websocket":
            qs = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            token = (qs.get("api_key") or [None])[0]
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


# ---------------------------------------------------------------------------------------------------
# Body reading with limits
# ---------------------------------------------------------------------------------------------------


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise ApiError(400, "bad_request", "invalid Content-Length") from None
        if n > limit:
            raise ApiError(
                413, "payload_too_large", f"request body is {n} bytes, at most {limit} are accepted"
            )
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload_too_large", f"request body is over {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


async def _read_json(request: Request, limit: int) -> Any:
    if _media_type(request) != "application/json":
        raise ApiError(
            415, "unsupported_media_type", "send the request as JSON (Content-Type: application/json)"
        )
    body = await _read_body(request, limit)
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {e}") from None


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


def _probe_seconds(data: bytes, limit: float) -> None:
    """Refuse prompt audio longer than ``limit`` before decoding it whole (a small compressed upload can
    hold hours of audio). Undecodable data passes here; the full decoder then explains what is wrong."""
    import io

    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
        if 0 < info.frames < 2**62 and info.samplerate > 0:
            seconds = info.frames / info.samplerate
            if seconds > limit:
                raise InputError(f"the audio is too long: {seconds:.2f} s, at most {limit:g} s is allowed")
            return
    except InputError:
        raise
    except Exception:  # noqa: BLE001 - not a libsndfile format: count decoded samples with PyAV
        pass
    try:
        import av

        with av.open(io.BytesIO(data), mode="r") as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                return
            seconds = 0.0
            for frame in container.decode(stream):
                seconds += frame.samples / max(1, frame.sample_rate)
                if seconds > limit:
                    raise InputError(
                        f"the audio is too long: over {limit:g} s (at most {limit:g} s is allowed)"
                    )
    except InputError:
        raise
    except Exception:  # noqa: BLE001
        return


# ---------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------


class _StreamResponse(StreamingResponse):
    """A streaming response that cancels its synthesis however it ends (done, error, client gone)."""

    def __init__(self, content, on_close: Callable[[], None], **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class Server:
    """State shared by the routes: the model, settings, voice store, slots, worker pool and metrics."""

    def __init__(self, tts, settings: Settings) -> None:
        self.tts = tts
        self.settings = settings
        self.sample_rate = int(tts.sample_rate)
        self.metrics = Metrics()
        self.slots = Slots(settings.max_active, self.metrics)
        # Slots bound the model work; the pool has room for all of it, so no accepted request waits here.
        self.executor = ThreadPoolExecutor(
            max_workers=self.slots.n + 1, thread_name_prefix="cosyvoice2-synth"
        )
        self.store = VoiceStore(settings.resolved_data_dir(), cache_size=settings.voice_cache_size)
        self.metrics.voices.set(self.store.count())
        self.started_at = time.time()
        try:
            self.builtin = list(tts.speakers())
        except Exception:  # noqa: BLE001
            self.builtin = []

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

    def acquire(self) -> None:
        if not self.slots.try_acquire():
            self.metrics.rejected.inc()
            raise ApiError(
                429,
                "rate_limited",
                f"all {self.slots.n} synthesis slots are busy; retry shortly",
                headers={"Retry-After": str(self.settings.retry_after)},
            )

    def start_bridge(
        self, produce: Callable[[CancelToken], Iterator], cancelled: threading.Event | None = None
    ) -> Bridge:
        """Take a slot (or raise 429) and start ``produce`` in a worker, which releases the slot when done."""
        bridge = Bridge(
            asyncio.get_running_loop(), produce, self.slots.release, self.settings.buffer_chunks, cancelled
        )
        self.acquire()
        bridge.start(self.executor)
        return bridge

    def encoded_stream(
        self, text, voice, fmt: str, opts: SpeechOptions, speed: float
    ) -> Callable[[CancelToken], Iterator]:
        """A producer of (bytes, n_samples) pairs: the request's audio encoded as it is made."""
        tts, sample_rate = self.tts, self.sample_rate

        def produce(cancel: CancelToken) -> Iterator[tuple[bytes, int]]:
            encoder = AudioStreamEncoder(fmt, sample_rate)
            gen = tts.stream(
                text, voice=voice, instruct=opts.instruction(), speed=speed, seed=opts.seed, cancel=cancel
            )
            try:
                for chunk in gen:
                    yield encoder.encode(chunk), int(np.asarray(chunk).size)
                yield encoder.close(), 0
            finally:
                gen.close()

        return produce


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

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError) -> JSONResponse:
        err = _as_api_error(exc)
        request.scope[ERROR_CODE_KEY] = err.code
        return err.response()

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
            "auth": settings.api_key is not None,
            "uptime_seconds": round(time.time() - server.started_at, 1),
        }

    @app.get("/metrics", include_in_schema=False)
    async def metrics_route() -> Response:
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
        payload = await _read_json(request, settings.max_json_bytes)
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

        if req.stream is False:
            produce = _offline(server, text, voice, fmt, req, speed)
            bridge = server.start_bridge(produce)
            try:
                data, n = await bridge.result()
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

        bridge = server.start_bridge(server.encoded_stream(text, voice, fmt, req, speed))
        first: list[bytes] = []
        samples = 0
        try:  # wait for the first audio bytes, so request errors still get a proper status code
            while True:
                kind, item = await bridge.get()
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
            except (Cancelled, asyncio.CancelledError):
                raise
            except BaseException as e:
                err = _as_api_error(e)
                metrics.errors.inc(route=route, code=err.code)
                log.warning("speech stream %s failed after it started: %s", request_id, err.message)
                raise

        def on_close() -> None:
            bridge.cancel()
            metrics.active_streams.dec()

        return _StreamResponse(body(), on_close=on_close, media_type=content_type(fmt), headers=headers)

    # -- voices --------------------------------------------------------------------------------------

    @app.post("/v1/voices", status_code=201)
    async def create_voice(request: Request) -> JSONResponse:
        if _media_type(request) != "multipart/form-data":
            raise ApiError(
                415,
                "unsupported_media_type",
                "upload the voice as multipart/form-data (fields audio, text, name)",
            )
        body = await _read_body(request, settings.max_upload_bytes + 64 * 1024)
        form = await _parse_form(request, body, settings)
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
            data = await upload.read()
            if len(data) > settings.max_upload_bytes:
                raise ApiError(413, "payload_too_large", f"audio is over {settings.max_upload_bytes} bytes")
            if not data:
                raise ApiError(400, "invalid_request", "the uploaded audio is empty", param="audio")
            text = _form_text(form, "text", MAX_TRANSCRIPT_CHARS)
            name = clean_name(_form_text(form, "name", 200))
        finally:
            await form.close()

        tts = server.tts

        def make(cancel: CancelToken) -> Iterator[Any]:  # voice cloning is short: not cancelled midway
            _probe_seconds(data, settings.max_voice_seconds)
            voice = tts.voice(data, text=text, name=name)
            if voice.duration and voice.duration < settings.min_voice_seconds:
                raise InputError(
                    f"the audio is too short: at least {settings.min_voice_seconds:g} s is required"
                )
            yield server.store.add(voice, name)

        bridge = server.start_bridge(make)
        try:
            info = await bridge.result()
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

    # add_middleware wraps the app: the last one added is the outermost (metrics, then CORS, then auth).
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
    app.add_middleware(MetricsMiddleware, metrics=metrics)
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
            text, voice=voice, instruct=opts.instruction(), speed=speed, seed=opts.seed, cancel=cancel
        )
        yield encode_audio(audio, sample_rate, fmt), int(np.asarray(audio).size)

    return produce


_AUDIO_LIKE = {"application/octet-stream", "video/webm", "video/mp4", "video/ogg", "application/ogg"}


def _audio_content_type(ctype: str) -> bool:
    return ctype.startswith("audio/") or ctype in _AUDIO_LIKE


async def _parse_form(request: Request, body: bytes, settings: Settings):
    """Parse an already size-checked multipart body (replayed to Starlette's parser)."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    replay = Request(request.scope, receive)
    try:
        return await replay.form(max_files=1, max_fields=8, max_part_size=64 * 1024)
    except Exception as e:  # noqa: BLE001 - MultiPartException / HTTPException(400) / decode errors
        detail = getattr(e, "detail", None) or getattr(e, "message", None) or str(e) or "malformed form data"
        raise ApiError(400, "invalid_multipart", f"could not parse the upload: {detail}") from None


def _form_text(form, key: str, limit: int) -> str | None:
    value = form.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(400, "invalid_request", f"'{key}' must be a text field, not a file", param=key)
    value = value.strip()
    if len(value) > limit:
        raise ApiError(400, "invalid_request", f"'{key}' is too long (at most {limit} characters)", param=key)
    if "\x00" in value:
        raise ApiError(400, "invalid_request", f"'{key}' contains a NUL character", param=key)
    return value or None


# ---------------------------------------------------------------------------------------------------
# WebSocket session
# ---------------------------------------------------------------------------------------------------


class _ClientGone(Exception):
    pass


async def _ws_send_error(ws: WebSocket, err: ApiError, close_code: int) -> None:
    with contextlib.suppress(Exception):
        if ws.application_state == WebSocketState.CONNECTED:
            await ws.send_json({"type": "error", **err.body()})
            await ws.close(close_code, err.message[:120])


def _ws_message_json(msg: dict) -> dict:
    text = msg.get("text")
    if text is None:
        raise ApiError(400, "invalid_message", "send JSON text messages, not binary ones")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ApiError(400, "invalid_json", f"message is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ApiError(400, "invalid_message", 'each message must be a JSON object with a "type"')
    return data


async def _ws_session(ws: WebSocket, server: Server) -> None:
    settings, metrics = server.settings, server.metrics
    route = WS_ROUTE
    status = "ok"
    await ws.accept()
    bridge: Bridge | None = None
    receiver: asyncio.Task | None = None
    streaming = False
    try:
        try:
            msg = await asyncio.wait_for(ws.receive(), settings.ws_start_timeout)
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
        t_start = time.perf_counter()
        if start.text:
            feed.put(start.text)
        bridge = server.start_bridge(server.encoded_stream(iter(feed), voice, fmt, start, speed), cancelled)
        await ws.send_json(
            {
                "type": "started",
                "request_id": request_id,
                "format": fmt,
                "content_type": content_type(fmt),
                "sample_rate": server.sample_rate,
            }
        )
        receiver = asyncio.create_task(_ws_receive(ws, feed, bridge, settings, len(start.text or "")))
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
                await ws.send_bytes(data)
                sent_bytes += len(data)
                chunks += 1
        t_end = time.perf_counter()
        audio_seconds = samples / server.sample_rate
        origin = feed.first_text_at or t_start
        first_latency = None if first_at is None else max(0.0, first_at - origin)
        compute = max(0.0, bridge.compute_seconds - feed.waited)
        _observe(metrics, route, audio_seconds, compute, first_latency)
        await ws.send_json(
            {
                "type": "done",
                "request_id": request_id,
                "first_packet_latency_ms": None if first_latency is None else round(first_latency * 1000, 1),
                "audio_seconds": round(audio_seconds, 3),
                "compute_seconds": round(compute, 3),
                "elapsed_seconds": round(t_end - origin, 3),
                "rtf": round(compute / audio_seconds, 4) if audio_seconds > 0 else None,
                "bytes": sent_bytes,
                "chunks": chunks,
                "sample_rate": server.sample_rate,
            }
        )
        with contextlib.suppress(Exception):
            await ws.close(1000)
    except Cancelled:  # the client sent "cancel"
        status = "cancelled"
        with contextlib.suppress(Exception):
            await ws.send_json({"type": "cancelled"})
            await ws.close(1000)
    except (_ClientGone, WebSocketDisconnect):
        status = "client_closed"
    except BaseException as e:
        if isinstance(e, asyncio.CancelledError):
            status = "cancelled"
            raise
        err = _as_api_error(e)
        if err.status >= 500:
            log.error("websocket request failed: %r", e)
        status = err.code
        metrics.errors.inc(route=route, code=err.code)
        close_code = 1013 if err.status == 429 else (1011 if err.status >= 500 else 1008)
        await _ws_send_error(ws, err, close_code)
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
    """Read the client's messages while audio is being sent: text pieces, end, cancel, or disconnect."""
    try:
        while True:
            timeout = None if feed.ended else settings.ws_idle_timeout
            try:
                msg = await asyncio.wait_for(ws.receive(), timeout)
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
                if "\x00" in piece:
                    raise ApiError(400, "invalid_message", "text contains a NUL character")
                total += len(piece)
                if total > settings.max_stream_chars:
                    raise ApiError(
                        400,
                        "input_too_long",
                        f"the streamed text is over {settings.max_stream_chars} characters",
                    )
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
