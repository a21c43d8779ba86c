"""The public Python API.

    import cosyvoice2
    tts = cosyvoice2.load()                     # the shipped model, or load("path/to/CosyVoice2-0.5B")
    voice = tts.voice("prompt.wav", text="transcript of the prompt")
    audio = tts.synthesize("Hello there.", voice=voice)           # float32 numpy, tts.sample_rate Hz
    for chunk in tts.stream(llm_text_pieces, voice=voice): ...    # audio while the text is still arriving
    async for chunk in tts.astream(async_text_pieces, voice=voice): ...  # the same from asyncio
    converted = tts.convert("source.wav", voice)                  # voice conversion

``voice`` is a ``VoiceReference``, the name of a built-in speaker, a path to a saved ``.voice`` file, or None
(the model's default voice). A voice with a transcript means zero-shot cloning, without one cross-lingual
synthesis, with ``instruct`` instruction-controlled synthesis (instruct2).

Every call goes through one ``cosyvoice2.engine.Engine``: calls from many threads (or tasks) at once are
served together, with LM decode steps batched across them, and a voice's prompt work is cached.
``load(path, compute="fast")`` picks reduced precision for this CPU (``cosyvoice2.cpu``; the plan is
``tts.compute_plan``); the default ``compute="exact"`` keeps parity with the official model. Finer opt-in
knobs are arguments of ``load`` too (``lm_quant``, ``flow_quant``, ``flow_steps``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from .audio import AudioSource
from .config import RATES
from .cpu import ComputePlan, check_compute
from .engine import Engine, EngineOptions
from .errors import InputError
from .model_dir import OFFICIAL_YAML, Models, load_official_dir
from .synthesis import Cancelled, CancelToken, Request, RequestTrace, StreamSchedule
from .voice import VoiceReference

VoiceLike = VoiceReference | str | Path | None


class CosyVoice2:
    """A loaded model. Thread-safe: requests keep their state to themselves and run concurrently."""

    def __init__(
        self, models: Models, options: EngineOptions | None = None, compute_plan: ComputePlan | None = None
    ) -> None:
        self.models = models
        # What ``load`` chose for this CPU (precision of LM and flow, and why); None when the caller
        # prepared ``models`` itself.
        self.compute_plan = compute_plan
        self.engine = Engine(models, options)
        self.synth = self.engine.synth
        self.sample_rate = RATES.sample_rate

    def close(self) -> None:
        """Stop the engine's LM thread (requests in flight fail). The object is unusable afterwards."""
        self.engine.close()

    # -- voices ------------------------------------------------------------------------------------

    def voice(
        self,
        audio: AudioSource,
        text: str | None = None,
        *,
        name: str | None = None,
        src_rate: int | None = None,
    ) -> VoiceReference:
        """Compute a reusable voice from prompt audio (0.5-30 s) and, optionally, its transcript."""
        return self.models.frontend.voice(audio, text, name=name, src_rate=src_rate)

    def speakers(self) -> list[str]:
        return sorted(self.models.speakers)

    def resolve_voice(self, voice: VoiceLike) -> VoiceReference | None:
        if voice is None or isinstance(voice, VoiceReference):
            return voice
        if isinstance(voice, str | Path):
            name = str(voice)
            if name in self.models.speakers:
                return self.models.speakers[name]
            if name.endswith(".voice") or Path(name).is_file():
                return VoiceReference.load(name)
            return self.models.speaker(name)  # raises with the list of known speakers
        raise InputError(
            f"voice must be a VoiceReference, a speaker name or a .voice path, not {type(voice).__name__}"
        )

    # -- synthesis ---------------------------------------------------------------------------------

    def request(
        self,
        text,
        voice: VoiceLike = None,
        instruct: str | None = None,
        speed: float = 1.0,
        seed: int | None = None,
        stream: bool = False,
        schedule: StreamSchedule | str | None = None,
        text_frontend: bool = True,
        trace: RequestTrace | None = None,
        max_tokens: int | None = None,
        cross_lingual: bool | None = None,
    ) -> Request:
        schedule = StreamSchedule.parse(schedule)
        if text is not None and not isinstance(text, str) and not isinstance(text, Iterable):
            raise InputError(f"text must be a string or an iterable of strings, not {type(text).__name__}")
        return Request(
            text=text,
            voice=self.resolve_voice(voice),
            instruct=instruct,
            speed=float(speed),
            seed=seed,
            stream=stream,
            schedule=schedule,
            text_frontend=text_frontend,
            trace=trace,
            max_tokens=max_tokens,
            cross_lingual=cross_lingual,
        )

    def synthesize(
        self,
        text: str | Iterable[str],
        voice: VoiceLike = None,
        instruct: str | None = None,
        speed: float = 1.0,
        seed: int | None = None,
        progress: bool = False,
        *,
        schedule: StreamSchedule | str | None = None,
        trace: RequestTrace | None = None,
        cancel: CancelToken | None = None,
        max_tokens: int | None = None,
        cross_lingual: bool | None = None,
    ) -> np.ndarray:
        """Text (any length; long texts are split into sentences) -> float32 audio [n].

        ``schedule=None`` (default) runs the official offline flow (full attention, official parity).
        ``schedule="fast"`` synthesises through the streaming path and joins the chunks: the voice's
        prompt work is cached and reused, at a small, bounded difference (tests/test_streaming.py).
        ``cancel``: cancelling it from another thread stops the work at once; the call then raises
        ``Cancelled``. ``max_tokens``: the most speech tokens (25 per second of speech) one sentence may
        take; past it the call raises ``cosyvoice2.errors.TooLong`` (None: no limit).
        ``cross_lingual``: True, the LM starts without the voice's transcript (for a text in another
        language); False, it continues from it (zero-shot); None, the model decides
        (``cosyvoice2.synthesis``: the shipped default model starts without it; official models continue).
        """
        streamed = schedule is not None  # the fast path runs as a stream and joins its chunks
        req = self.request(
            text,
            voice,
            instruct,
            speed,
            seed,
            streamed,
            schedule,
            trace=trace,
            max_tokens=max_tokens,
            cross_lingual=cross_lingual,
        )
        chunks = self.engine.run(req, cancel)
        if progress and not streamed and isinstance(text, str):
            from tqdm import tqdm

            n = len(self.models.frontend.text_pieces(text))
            if n > 1:
                chunks = tqdm(chunks, total=n, unit="sentence", desc="synthesising")
        return _checked(_join(chunks), cancel)

    def stream(
        self,
        text: str | Iterable[str],
        voice: VoiceLike = None,
        instruct: str | None = None,
        speed: float = 1.0,
        seed: int | None = None,
        schedule: StreamSchedule | str | None = None,
        text_frontend: bool = True,
        *,
        trace: RequestTrace | None = None,
        cancel: CancelToken | None = None,
        max_tokens: int | None = None,
        cross_lingual: bool | None = None,
    ) -> Iterator[np.ndarray]:
        """Audio chunks as they are made. ``text`` may be an iterable of pieces still being written.

        ``schedule``: "fast" (default: small first chunk, then growing chunks, O(chunk) work each) or
        "official" (the official chunk loop, reproducible chunk for chunk). Closing the returned
        generator (or dropping it) cancels the request and frees its state; so does cancelling ``cancel``,
        from any thread, also while a chunk is being made (the iteration then ends). ``max_tokens``
        bounds the speech tokens of one flow pass (a sentence of a string, or all of a streamed text) and
        so the stream's flow state; past it the stream raises ``cosyvoice2.errors.TooLong``.
        ``cross_lingual`` as in ``synthesize`` (None with a streamed text: the LM continues from the voice's
        transcript, the text's language being unknown when it starts).
        """
        req = self.request(
            text,
            voice,
            instruct,
            speed,
            seed,
            stream=True,
            schedule=schedule,
            text_frontend=text_frontend,
            trace=trace,
            max_tokens=max_tokens,
            cross_lingual=cross_lingual,
        )
        with contextlib.closing(self.engine.run(req, cancel)) as chunks:
            for chunk in chunks:
                yield chunk.detach().numpy().astype(np.float32, copy=False)

    async def astream(
        self,
        text: str | Iterable[str] | AsyncIterable[str],
        voice: VoiceLike = None,
        instruct: str | None = None,
        speed: float = 1.0,
        seed: int | None = None,
        schedule: StreamSchedule | str | None = None,
        text_frontend: bool = True,
        *,
        trace: RequestTrace | None = None,
        max_buffered: int = 4,
        cross_lingual: bool | None = None,
    ) -> AsyncIterator[np.ndarray]:
        """``stream`` for asyncio: an async generator of audio chunks; ``text`` may be an async iterable.

        The synthesis runs in a thread of its own; the event loop never blocks on model work. At most
        ``max_buffered`` chunks wait for the consumer (then synthesis pauses). Leaving the loop early,
        ``aclose()`` or cancelling the task cancels the request at once, also in the middle of a chunk.
        """
        loop = asyncio.get_running_loop()
        feed = _TextFeed() if isinstance(text, AsyncIterable) else None
        sync_text = iter(feed) if feed is not None else text
        cancel = CancelToken()
        gen = self.stream(
            sync_text,
            voice,
            instruct,
            speed,
            seed,
            schedule,
            text_frontend,
            trace=trace,
            cancel=cancel,
            cross_lingual=cross_lingual,
        )  # validates arguments lazily, in the thread below
        out: asyncio.Queue = asyncio.Queue()
        room = threading.Semaphore(max(1, int(max_buffered)))  # chunks the consumer has not taken yet
        stop = threading.Event()

        def put(item) -> bool:
            """From the thread: hand an item to the loop once there is room; False once cancelled."""
            while not room.acquire(timeout=0.25):
                if stop.is_set():
                    return False
            if stop.is_set():
                return False
            try:
                loop.call_soon_threadsafe(out.put_nowait, item)
            except RuntimeError:  # the loop is closed
                return False
            return True

        def run() -> None:
            try:
                with contextlib.closing(gen):
                    for chunk in gen:
                        if not put(chunk):
                            return
                put(_DONE)
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer task
                put(e)

        pump = None
        if feed is not None:
            pump = asyncio.ensure_future(feed.pump(text))
        thread = threading.Thread(target=run, name="cosyvoice2-astream", daemon=True)
        thread.start()
        try:
            while True:
                item = await out.get()
                room.release()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            cancel.cancel()  # stops the synthesis thread now, not after the chunk it is making
            if feed is not None:
                feed.close()
            if pump is not None and not pump.done():
                pump.cancel()

    def convert(
        self,
        source: AudioSource,
        voice: VoiceLike,
        speed: float = 1.0,
        seed: int | None = None,
        src_rate: int | None = None,
    ) -> np.ndarray:
        """Voice conversion: the source's words and timing in ``voice``'s timbre."""
        target = self.resolve_voice(voice)
        if target is None:
            raise InputError("voice conversion needs a target voice")
        tokens = self.models.frontend.source_tokens(source, src_rate=src_rate)
        req = Request(source_tokens=tokens, voice=target, speed=float(speed), seed=seed)
        return _join(self.engine.run(req))


_DONE = object()


class _TextFeed:
    """An async iterable of text pieces, pumped on the event loop, read as a blocking iterator."""

    _END = object()

    def __init__(self) -> None:
        import queue

        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = threading.Event()

    async def pump(self, pieces: AsyncIterable[str]) -> None:
        try:
            async for piece in pieces:
                if self._closed.is_set():
                    return
                self._q.put(piece)
            self._q.put(self._END)
        except asyncio.CancelledError:
            self._q.put(self._END)
            raise
        except BaseException as e:  # noqa: BLE001 - raised where the text is read
            self._q.put(e)

    def close(self) -> None:
        """The consumer went away: whoever reads the text stops at once (the request is cancelled)."""
        from .engine import Cancelled

        self._closed.set()
        self._q.put(Cancelled())

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._q.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


def _checked(audio: np.ndarray, cancel: CancelToken | None) -> np.ndarray:
    """A cancelled call must not pass off the audio made so far as the whole utterance."""
    if cancel is not None and cancel.cancelled:
        raise Cancelled("the request was cancelled")
    return audio


def _join(chunks: Iterable[torch.Tensor]) -> np.ndarray:
    parts = [c.detach().numpy().astype(np.float32, copy=False) for c in chunks]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


_QUANT_CHOICES = (None, "fp32", "int8", "bf16")
_VOCODER_QUANT_CHOICES = (None, "fp32", "bf16")  # no int8 convolutions


def _check_quants(lm_quant: str | None, flow_quant: str | None, vocoder_quant: str | None) -> None:
    """The precision knobs of ``load`` and ``speed_up``: a clear error for a value they do not offer."""
    for name, value, choices in (
        ("lm_quant", lm_quant, _QUANT_CHOICES),
        ("flow_quant", flow_quant, _QUANT_CHOICES),
        ("vocoder_quant", vocoder_quant, _VOCODER_QUANT_CHOICES),
    ):
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise InputError(f"{name} must be one of {allowed}, got {value!r}")


def load(
    path: str | Path | None = None,
    *,
    compute: str = "exact",
    text_backend: str = "auto",
    lm_quant: str | None = None,
    flow_quant: str | None = None,
    flow_steps: int | None = None,
    cfg_steps: int | None = None,
    first_chunk_steps: int | None = None,
    vocoder_quant: str | None = None,
    **engine_options,
) -> CosyVoice2:
    """Load a model directory: an official CosyVoice2-0.5B download, or (None) the shipped default model.

    ``compute``: "exact" (default: float32, today's path bit for bit, the official numbers on every
    machine) or "fast" (the precision this CPU runs fastest, chosen by ``cosyvoice2.cpu.plan`` from its
    features: int8 LM weights where fbgemm runs, a bf16 flow estimator where the CPU has native bf16, else
    an int8 one; outputs move by a measured amount, see README). The plan is ``tts.compute_plan``. Not
    called ``speed``: that is the speaking rate of ``synthesize``.

    Finer knobs override the plan's entries: ``lm_quant`` ("int8": the LM backbone's Linear weights in int8,
    ~4x less memory traffic per decode step; since activations are quantised per backbone call, with one
    scale for all the rows decoded together, a request's tokens also depend on which requests share its
    decode steps; "bf16": bf16 weights, half the traffic, rows independent; "fp32": as loaded);
    ``flow_quant`` ("int8": the flow estimator's transformer Linears in int8; "bf16": the estimator under
    bf16 autocast; "fp32"). ``flow_steps`` (official: 10) sets the number of Euler steps of the flow's ODE:
    flow time is proportional to it (the flow dominates CPU time), at a cost in quality that random-weight
    benchmarks cannot show: check it on real weights before using it. ``cfg_steps``: classifier-free
    guidance on the first k Euler steps only (the others run the estimator on one row instead of two);
    ``first_chunk_steps``: Euler steps of a fast stream's first chunk only (first-packet latency); both
    None by default (official; see ``FlowConfig`` and bench/README.md for what they cost and save).
    ``vocoder_quant`` ("bf16": the vocoder's decoder convolutions under bf16 autocast; "fp32").
    ``engine_options`` are the fields of ``cosyvoice2.engine.EngineOptions`` (``max_batch``,
    ``flow_slots``, ``prompt_cache_mb``, ...).
    """
    from . import cpu

    check_compute(compute)
    _check_quants(lm_quant, flow_quant, vocoder_quant)
    plan = cpu.plan(compute).with_overrides(
        lm_quant, flow_quant, flow_steps, cfg_steps, first_chunk_steps, vocoder_quant
    )
    if path is None:
        from .default_model import default_model_dir

        path = default_model_dir()
    root = Path(path)
    try:
        options = EngineOptions(**engine_options)
    except TypeError as e:
        raise InputError(f"unknown load option: {e}") from None
    if (root / OFFICIAL_YAML).exists():
        models = load_official_dir(root, text_backend=text_backend)
    else:
        from .default_model import NATIVE_CONFIG, load_native_dir

        if not (root / NATIVE_CONFIG).exists():
            from .errors import ModelLoadError

            raise ModelLoadError(f"{root} is not a model directory (no {OFFICIAL_YAML} or {NATIVE_CONFIG})")
        models = load_native_dir(root, text_backend=text_backend)
    speed_up(models, **plan.load_options())
    return CosyVoice2(models, options, plan)


def speed_up(
    models: Models,
    *,
    lm_quant: str | None = None,
    flow_quant: str | None = None,
    flow_steps: int | None = None,
    cfg_steps: int | None = None,
    first_chunk_steps: int | None = None,
    vocoder_quant: str | None = None,
) -> Models:
    """Apply the opt-in CPU speed modes to loaded models, in place (see ``load``; None/"fp32": unchanged)."""
    _check_quants(lm_quant, flow_quant, vocoder_quant)
    sampler = {}  # FlowConfig fields: Euler steps, guided steps, first-chunk steps
    for name, key, value, low in (
        ("flow_steps", "n_timesteps", flow_steps, 1),
        ("cfg_steps", "cfg_steps", cfg_steps, 0),
        ("first_chunk_steps", "first_chunk_steps", first_chunk_steps, 1),
    ):
        if value is None:
            continue
        if not isinstance(value, int) or not low <= value <= 100:
            raise InputError(f"{name} must be an integer in [{low}, 100], got {value!r}")
        sampler[key] = value
    if sampler:
        models.flow.cfg = dataclasses.replace(models.flow.cfg, **sampler)
    if lm_quant == "int8" and models.lm is not None:
        from .engine import quantize_lm_int8

        quantize_lm_int8(models.lm)
    elif lm_quant == "bf16" and models.lm is not None:
        from .engine import cast_backbone_bf16

        cast_backbone_bf16(models.lm)
    if flow_quant == "int8":
        from .engine import quantize_flow_int8

        quantize_flow_int8(models.flow)
    elif flow_quant == "bf16":
        from .engine import cast_flow_bf16

        cast_flow_bf16(models.flow)
    if vocoder_quant == "bf16":
        from .engine import cast_hift_bf16

        cast_hift_bf16(models.hift)
    return models
