"""One request type and one code path for every mode.

A ``Request`` says what to say (text, a stream of text pieces, or source speech tokens for voice
conversion), in which voice, and how (instruction, speed, seed, streaming schedule). ``Synthesizer.run``
turns it into audio chunks. The mode falls out of the request instead of being a method per mode:

=====================  ===============================  ======================  ==================
request                LM prompt text                   LM prompt speech        flow prompt
=====================  ===============================  ======================  ==================
voice with transcript  transcript ids (zero-shot)       voice tokens (aligned)  tokens + mel + emb
voice, no transcript   none (cross-lingual)             none                    tokens + mel + emb
  or cross_lingual
voice + instruct       instruction ids (instruct2)      none                    tokens + mel + emb
embedding-only voice   none (sft)                       none                    embedding only
source tokens (vc)     LM skipped                       -                       unaligned tokens/mel
=====================  ===============================  ======================  ==================

``cross_lingual`` (None by default) says whether the LM starts after the voice's transcript and prompt tokens
or without them. None leaves it to the model (``Models.prompt_language``): official model directories always
continue from the transcript, as the official ``inference_zero_shot`` does; a native model starts without
it when the text's language (``text.text_language``) is not the transcript's ("match", the default), or
always ("never", what the shipped default model's config says, because its small LM reads worse after a
prompt, most of all one in another language: measurements in MODEL_CARD.md, build 11).

All per-request state (RNG, LM cache row, flow/vocoder stream state, chunk offsets, the trace) lives in
locals of the request's generator or on the request; models are shared read-only, so any number of
requests can run side by side. Three things are pluggable so that ``cosyvoice2.engine.Engine`` can serve
many requests at once through this same code: where speech tokens come from (``DirectLM`` decodes in the
caller's thread; the engine batches decode steps across requests), where a voice's flow state after the
prompt comes from (computed per request, or from the engine's prompt cache), a guard around
flow/vocoder work (the engine bounds how many run at once), and who solves the fast stream's flow ODE (by
default the request's own thread; the engine's flow batcher runs the ODE steps of all streams' chunks that
are ready at the same time as one estimator call).

Cancelling: ``run`` takes an optional ``CancelToken``; cancelling it from any thread stops the request at
its next checkpoint (each chunk; a flow chunk waiting in the engine's batcher is dropped at once) with
``Cancelled``.

Randomness: each request owns a ``torch.Generator`` seeded with ``seed``. Offline synthesis draws the LM
samples and then the vocoder noise from it, in the official order, so a seed reproduces the official
audio. A streaming request interleaves LM and vocoder work, so its vocoder gets its own generator
derived from the seed: streaming output is still reproducible from the seed alone.

Streaming schedules (``StreamSchedule``):

* ``official``: CosyVoice2Model's loop (SPEC §10): every chunk re-runs the flow from token 0 (work per
  chunk grows with the prefix, quadratic in total) and the final chunk uses full attention. Reproduces
  the official chunks sample for sample.
* ``fast`` (default): the flow keeps a block-causal state between chunks (``Flow.stream_step``), so each
  chunk costs O(chunk); the voice's state after the prompt is computed once and shared. Chunks start
  small (first packet) and grow. Vocoder chunks are joined with the official overlap + cross-fade.
  Block-causal attention is a different (streaming) approximation of the offline output than the
  official chunk masks; tests/test_streaming.py bounds the difference.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import RATES
from .errors import InputError, TooLong
from .text import text_language
from .voice import VoiceReference

if TYPE_CHECKING:
    from .flow import FlowBlock

MAX_SPEED = 3.0
MIN_SPEED = 0.5


@dataclass(frozen=True)
class StreamSchedule:
    """How many speech tokens each streamed chunk covers.

    ``official`` reproduces CosyVoice2Model: the first chunk is ``first`` tokens plus padding that puts the
    end of prompt + first chunk on a ``first``-token boundary, then chunks grow by ``growth`` up to
    ``max``; every chunk re-runs the flow from token 0 and the final one uses full attention (SPEC §10).
    We start every request at ``first`` (the official object keeps the grown hop for later requests,
    SPEC §16.1: a leak we do not reproduce).
    ``fast`` keeps the flow's state between chunks so a chunk costs O(chunk); the first chunk is small
    (``first`` tokens = 2 * first mel frames; the vocoder holds back its 8-frame overlap, so the first
    packet carries 2 * first - 8 frames of audio).
    """

    kind: Literal["official", "fast"] = "fast"
    first: int = 8
    growth: int = 2
    max: int = 50

    @classmethod
    def official(cls) -> StreamSchedule:
        return cls(kind="official", first=25, growth=2, max=100)

    @classmethod
    def parse(cls, schedule: StreamSchedule | str | None) -> StreamSchedule:
        if schedule is None or isinstance(schedule, StreamSchedule):
            return schedule or cls()
        if schedule == "official":
            return cls.official()
        if schedule == "fast":
            return cls()
        raise InputError(f"schedule must be 'fast', 'official' or a StreamSchedule, not {schedule!r}")

    def validate(self, mel_cache_frames: int = 8) -> None:
        if self.kind not in ("official", "fast"):
            raise InputError(f"unknown stream schedule kind {self.kind!r}")
        # A non-final vocoder chunk must cover the vocoder's overlap (official: 8 mel frames).
        least = -(-mel_cache_frames // RATES.token_mel_ratio)
        if not (least <= self.first <= self.max) or self.growth < 1:
            raise InputError(
                f"stream schedule needs {least} <= first <= max and growth >= 1, got first={self.first} "
                f"max={self.max} growth={self.growth}"
            )


@dataclass
class ChunkTrace:
    """Work done for one emitted chunk (``estimator_frames`` is what the flow's ODE ran over)."""

    tokens: int  # new speech tokens covered by this chunk
    estimator_frames: int  # mel frames the flow estimator processed (prompt frames included)
    context_frames: int  # frames before the block: cached (fast) or recomputed (official: included above)
    samples: int  # audio samples emitted
    flow_s: float
    vocoder_s: float
    at_s: float  # seconds since the request started, when the chunk was ready
    # With the engine's flow batcher (fast schedule): seconds the chunk's ODE waited before its first
    # estimator call (included in flow_s), and the most streams' chunks that shared one of its calls.
    flow_wait_s: float = 0.0
    flow_batch: int = 1


@dataclass
class RequestTrace:
    """Per-request record of what the pipeline did (pass one in ``Request.trace``; it is filled in)."""

    started: float = field(default_factory=time.perf_counter)
    chunks: list[ChunkTrace] = field(default_factory=list)
    lm_tokens: int = 0
    speech_tokens: list[int] = field(default_factory=list)  # the LM's tokens, in order
    prompt_cache_hit: bool | None = None  # fast streaming: whether the voice's flow state was cached
    first_audio_s: float | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


@dataclass(frozen=True)
class Request:
    text: str | Iterable[str] | None = None
    voice: VoiceReference | None = None
    instruct: str | None = None
    source_tokens: Tensor | None = None  # voice conversion: [L] speech tokens of the source audio
    speed: float = 1.0
    seed: int | None = None
    stream: bool = False
    schedule: StreamSchedule = field(default_factory=StreamSchedule)
    text_frontend: bool = True
    trace: RequestTrace | None = None
    # The most speech tokens one flow pass may take (None: no limit): each text piece of a string, or all of
    # a streamed text. A fast stream's flow state grows with every token (``Flow.stream_bytes_per_frame``),
    # so this bounds a request's memory; past it the request ends with ``TooLong``.
    max_tokens: int | None = None
    # True: the LM ignores the voice's transcript and prompt tokens (cross-lingual); False: it continues from
    # them (zero-shot); None: the model decides (module docstring). The flow always uses the voice's prompt.
    cross_lingual: bool | None = None

    def validate(self) -> None:
        if not (MIN_SPEED <= float(self.speed) <= MAX_SPEED):
            raise InputError(f"speed must be between {MIN_SPEED} and {MAX_SPEED}, got {self.speed}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise InputError(f"max_tokens must be a positive integer or None, got {self.max_tokens!r}")
        if self.stream:
            self.schedule.validate()
        if self.source_tokens is not None:
            if self.text is not None:
                raise InputError("voice conversion takes source audio, not text")
            if self.voice is None or not self.voice.has_prompt:
                raise InputError("voice conversion needs a target voice made from prompt audio")
            return
        if self.text is None:
            raise InputError("no text to speak")
        if self.instruct is not None and (self.voice is None or not self.voice.has_prompt):
            raise InputError("instruct needs a voice with prompt audio (give a prompt or a saved voice)")
        if self.seed is not None and not isinstance(self.seed, int):
            raise InputError("seed must be an integer")
        if self.cross_lingual is not None and not isinstance(self.cross_lingual, bool):
            raise InputError("cross_lingual must be true, false or null")


def new_generator(seed: int | None, salt: int = 0) -> torch.Generator:
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    return torch.Generator().manual_seed((int(seed) + salt) % (2**63))


VOCODER_SALT = 0x5EED  # streaming: the vocoder's generator is derived from the request seed


class Cancelled(Exception):
    """Raised inside a request's work once it was cancelled (``CancelToken``, or its LM row taken back)."""


class CancelToken:
    """Cancels one request from any thread.

    ``cancel()`` sets ``cancelled`` and runs the callbacks registered with ``add`` once, in the cancelling
    thread (they must be quick and thread-safe: drop a queued flow chunk, give back an LM row); a callback
    added after the cancel runs at once. ``add`` returns a function that unregisters the callback.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._callbacks: dict[int, Callable[[], object]] = {}
        self.cancelled = False

    def add(self, fn: Callable[[], object]) -> Callable[[], None]:
        with self._lock:
            if not self.cancelled:
                key = next(self._ids)
                self._callbacks[key] = fn

                def remove() -> None:
                    with self._lock:
                        self._callbacks.pop(key, None)

                return remove
        fn()
        return lambda: None

    def cancel(self) -> None:
        with self._lock:
            if self.cancelled:
                return
            self.cancelled = True
            callbacks, self._callbacks = list(self._callbacks.values()), {}
        for fn in callbacks:
            fn()

    def check(self) -> None:
        if self.cancelled:
            raise Cancelled()


def _check(cancel: CancelToken | None) -> None:
    if cancel is not None:
        cancel.check()


def _close_quietly(tokens) -> None:
    """Close a token iterator from another thread (a generator running right now refuses: it then stops
    at the request's next checkpoint instead)."""
    with contextlib.suppress(ValueError):
        tokens.close()


@dataclass
class _Prompt:
    """The per-request view of a voice for one mode (tensors are shared with the voice, never mutated)."""

    lm_text: list[int]  # prompt text ids for the LM (transcript or instruction)
    lm_speech: Tensor  # [Lp] prompt speech tokens for the LM
    flow_tokens: Tensor  # [1, P] int32
    flow_mel: Tensor  # [1, 2P, 80]
    embedding: Tensor  # [1, D]

    def flow_key(self) -> str:
        """Content hash of what the flow's prompt state depends on (same voice file -> same key)."""
        h = hashlib.blake2b(digest_size=16)
        for t in (self.flow_tokens, self.flow_mel, self.embedding):
            t = t.detach().contiguous().cpu()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Pluggable pieces
# --------------------------------------------------------------------------------------------------


class LMBackend(Protocol):
    """Where speech tokens come from. Iterators must stop their work (and free rows) when closed."""

    def generate(self, text_ids: list[int], prompt: _Prompt, gen: torch.Generator) -> Iterator[int]: ...

    def generate_bistream(
        self, chunks: Iterator[list[int]], prompt: _Prompt, gen: torch.Generator
    ) -> Iterator[int]: ...


class DirectLM:
    """Decode in the caller's thread with a private KV cache (no batching)."""

    def __init__(self, models) -> None:
        self.models = models

    def generate(self, text_ids, prompt, gen):
        return self.models.lm_generate(text_ids, prompt.lm_text, prompt.lm_speech, gen)

    def generate_bistream(self, chunks, prompt, gen):
        return self.models.lm_generate_bistream(chunks, prompt.lm_text, prompt.lm_speech, gen)


FlowStartFn = Callable[[_Prompt, Callable[[], object]], tuple[object, bool]]


def _no_cache(prompt: _Prompt, compute: Callable[[], object]) -> tuple[object, bool]:
    return compute(), False


def _no_guard(first: bool = False) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


# (block, first chunk of the stream, cancel token) -> (seconds waited before the first estimator call, most
# streams in one of its calls); solves ``block``'s ODE to the end (``Flow.euler_step`` until done).
FlowSolveFn = Callable[["FlowBlock", bool, "CancelToken | None"], tuple[float, int]]


class Synthesizer:
    """Runs requests against one set of loaded models (see ``cosyvoice2.api.load``).

    ``lm``: token source (default ``DirectLM``). ``flow_start``: ``(prompt, compute) -> (state, hit)``,
    e.g. a prompt cache (default: compute every time). ``compute(first)``: a context-manager factory
    entered around every flow/vocoder call, ``first`` for a stream's first chunk (default: none).
    ``flow_cache_dtype`` / ``static_chunks``: fast-stream flow state options (see ``Flow.stream_start``).
    ``flow_solve``: who runs the ODE of a fast-stream chunk (``FlowSolveFn``; the engine's flow batcher).
    None: ``Flow.stream_step`` in the request's thread, inside ``compute``. Otherwise only the encoder
    and the vocoder run inside ``compute``, and ``flow_solve`` is called outside it (it guards its own
    estimator calls).
    """

    def __init__(
        self,
        models,
        *,
        lm: LMBackend | None = None,
        flow_start: FlowStartFn | None = None,
        compute: Callable[..., contextlib.AbstractContextManager] | None = None,
        flow_cache_dtype: torch.dtype = torch.float32,
        static_chunks: bool = False,
        flow_solve: FlowSolveFn | None = None,
    ) -> None:
        self.models = models
        self.flow_solve = flow_solve
        self.lm = lm or DirectLM(models)
        self.flow_start = flow_start or _no_cache
        self.compute = compute or _no_guard
        self.flow_cache_dtype = flow_cache_dtype
        self.static_chunks = static_chunks

    # -- request -> prompt ---------------------------------------------------------------------

    def _prompt(self, req: Request) -> _Prompt:
        fe, voice = self.models.frontend, req.voice
        empty = torch.zeros(0, dtype=torch.int32)
        if voice is None:
            voice = self.models.default_voice()
        if not voice.has_prompt:  # sft: speaker embedding only
            return _Prompt(
                [], empty, empty.reshape(1, 0), torch.zeros(1, 0, RATES.n_mels), voice.embedding[None]
            )
        if req.source_tokens is not None:  # vc uses the unaligned prompt (official frontend_vc)
            tokens, mel = voice.speech_tokens, voice.mel
        else:
            tokens, mel = voice.aligned()
        lm_text: list[int] = []
        lm_speech = empty
        if req.instruct is not None:
            lm_text = fe.instruct_ids(req.instruct)
        elif voice.has_transcript and not self._cross_lingual(req, voice):
            lm_text = list(voice.text_tokens) if voice.text_tokens else fe.encode(voice.text)
            lm_speech = tokens
        return _Prompt(lm_text, lm_speech, tokens[None], mel[None], voice.embedding[None])

    def _cross_lingual(self, req: Request, voice: VoiceReference) -> bool:
        """Whether the LM starts without the voice's transcript and prompt tokens (module docstring)."""
        if req.cross_lingual is not None:
            return req.cross_lingual
        policy = self.models.prompt_language
        if policy == "never":
            return True
        if policy != "match" or not isinstance(req.text, str):
            return False  # official behaviour; a text still being streamed has no language yet
        want, have = text_language(req.text), text_language(voice.text or "")
        return want is not None and have is not None and want != have

    # -- the one code path -----------------------------------------------------------------------

    def run(self, req: Request, cancel: CancelToken | None = None) -> Iterator[Tensor]:
        """Yield float32 audio chunks [n] at RATES.sample_rate; one per text piece unless streaming.

        ``cancel``: cancelling it (from any thread) ends the request with ``Cancelled`` at its next chunk;
        its LM row is given back at once and a flow chunk waiting in ``flow_solve`` is dropped.
        """
        req.validate()
        prompt = self._prompt(req)
        gen = new_generator(req.seed)
        vgen = new_generator(req.seed, VOCODER_SALT) if req.stream else gen
        if req.source_tokens is not None:
            tokens = _limited(iter(req.source_tokens.reshape(-1).tolist()), req.max_tokens)
            yield from self._token2wav(tokens, prompt, req, vgen, cancel)
            return
        if isinstance(req.text, str):
            pieces = self.models.frontend.text_pieces(req.text) if req.text_frontend else [req.text]
            for piece in pieces:
                _check(cancel)
                ids = self.models.frontend.encode(piece)
                with self._tokens(self.lm.generate(ids, prompt, gen), cancel) as tokens:
                    counted = _limited(self._counted(tokens, req.trace), req.max_tokens)
                    yield from self._token2wav(counted, prompt, req, vgen, cancel)
        else:
            text_ids = self.models.stream_text_ids(req.text, req.text_frontend)
            with self._tokens(self.lm.generate_bistream(text_ids, prompt, gen), cancel) as tokens:
                counted = _limited(self._counted(tokens, req.trace), req.max_tokens)
                yield from self._token2wav(counted, prompt, req, vgen, cancel)

    @staticmethod
    @contextlib.contextmanager
    def _tokens(tokens: Iterator[int], cancel: CancelToken | None) -> Iterator[Iterator[int]]:
        """Close the token source on the way out, or as soon as the request is cancelled."""
        remove = None if cancel is None else cancel.add(lambda: _close_quietly(tokens))
        try:
            yield tokens
        finally:
            if remove is not None:
                remove()
            tokens.close()

    @staticmethod
    def _counted(tokens: Iterator[int], trace: RequestTrace | None) -> Iterator[int]:
        if trace is None:
            return tokens

        def count():
            for tok in tokens:
                trace.lm_tokens += 1
                trace.speech_tokens.append(tok)
                yield tok

        return count()

    # -- speech tokens -> audio ------------------------------------------------------------------

    def _token2wav(
        self, tokens: Iterator[int], prompt: _Prompt, req: Request, gen, cancel: CancelToken | None = None
    ) -> Iterator[Tensor]:
        if not req.stream:
            tokens = list(tokens)
            _check(cancel)
            yield self.offline(tokens, prompt, req.speed, gen, req.trace)
        elif req.schedule.kind == "official":
            yield from self.stream_official(tokens, prompt, req.schedule, req.speed, gen, req.trace, cancel)
        else:
            yield from self.stream_fast(tokens, prompt, req.schedule, req.speed, gen, req.trace, cancel)

    def offline(
        self, tokens: list[int], prompt: _Prompt, speed: float, gen, trace: RequestTrace | None = None
    ) -> Tensor:
        if not tokens:
            return torch.zeros(0)
        with self.compute():
            t0 = time.perf_counter()
            mel = self.models.flow_inference(tokens, prompt, streaming=False, finalize=True)
            mel = _apply_speed(mel, speed)
            t1 = time.perf_counter()
            audio, _ = self.models.hift.inference(mel, generator=gen)
            t2 = time.perf_counter()
        n_prompt = prompt.flow_tokens.shape[1]
        _record(trace, len(tokens), RATES.token_mel_ratio * (n_prompt + len(tokens)), 0, audio, t0, t1, t2)
        return audio[0]

    def stream_official(
        self,
        tokens: Iterator[int],
        prompt: _Prompt,
        schedule: StreamSchedule,
        speed: float,
        gen,
        trace: RequestTrace | None = None,
        cancel: CancelToken | None = None,
    ) -> Iterator[Tensor]:
        """The official chunk loop (SPEC §10): each chunk re-runs the flow on all tokens so far."""
        from .hift import VocoderStream

        look = self.models.flow.cfg.pre_lookahead_len
        ratio = RATES.token_mel_ratio
        n_prompt = prompt.flow_tokens.shape[1]
        hop = schedule.first
        pad = -n_prompt % hop  # prompt + first chunk end on a chunk boundary
        have: list[int] = []
        offset, vstate = 0, VocoderStream()
        for tok in tokens:
            have.append(tok)
            this_hop = hop + pad if offset == 0 else hop
            if len(have) - offset >= this_hop + look:
                _check(cancel)
                with self.compute(first=offset == 0):
                    t0 = time.perf_counter()
                    mel = self.models.flow_inference(
                        have[: offset + this_hop + look], prompt, streaming=True, finalize=False
                    )[:, :, offset * ratio :]
                    t1 = time.perf_counter()
                    audio, vstate = self.models.hift.stream_step(
                        vstate, _apply_speed(mel, speed), final=False, generator=gen
                    )
                    t2 = time.perf_counter()
                frames = ratio * (n_prompt + offset + this_hop)
                _record(trace, this_hop, frames, 0, audio, t0, t1, t2)
                offset += this_hop
                hop = min(schedule.max, hop * schedule.growth)
                if audio.numel():
                    yield audio[0]
        if not have:
            return
        # SPEC §16.2: the official final chunk runs the flow without chunk masks; the fixtures pin it.
        _check(cancel)
        with self.compute():
            t0 = time.perf_counter()
            mel = self.models.flow_inference(have, prompt, streaming=False, finalize=True)
            mel = mel[:, :, offset * ratio :]
            t1 = time.perf_counter()
            audio, _ = self.models.hift.stream_step(
                vstate, _apply_speed(mel, speed), final=True, generator=gen
            )
            t2 = time.perf_counter()
        _record(trace, len(have) - offset, ratio * (n_prompt + len(have)), 0, audio, t0, t1, t2)
        if audio.numel():
            yield audio[0]

    def flow_stream_start(self, prompt: _Prompt):
        """The flow's state after the voice prompt (from ``flow_start``, e.g. the engine's prompt cache)."""

        def compute():
            with self.compute():
                return self.models.flow_stream_start(
                    prompt, cache_dtype=self.flow_cache_dtype, static_chunks=self.static_chunks
                )

        return self.flow_start(prompt, compute)

    def stream_fast(
        self,
        tokens: Iterator[int],
        prompt: _Prompt,
        schedule: StreamSchedule,
        speed: float,
        gen,
        trace: RequestTrace | None = None,
        cancel: CancelToken | None = None,
    ) -> Iterator[Tensor]:
        """Chunk-causal streaming with the flow state kept between chunks: each chunk costs O(chunk)."""
        from .hift import VocoderStream

        look = self.models.flow.cfg.pre_lookahead_len
        ratio = RATES.token_mel_ratio
        tokens = iter(tokens)
        have: list[int] = []
        # Wait for the first token before touching the flow: a request that produces no speech (or is
        # cancelled first) costs nothing, and the LM is already decoding while the prompt state is made.
        for tok in tokens:
            have.append(tok)
            break
        if not have:
            return
        fstate, hit = self.flow_stream_start(prompt)
        if trace is not None:
            trace.prompt_cache_hit = hit
        vstate = VocoderStream()
        offset, hop = 0, schedule.first

        def chunk(new: list[int], ahead: list[int], final: bool):
            nonlocal fstate, vstate
            _check(cancel)
            before = fstate.n_tokens
            first = vstate.mel is None and not final
            waited, shared = 0.0, 1
            if self.flow_solve is None:
                with self.compute(first=first):
                    t0 = time.perf_counter()
                    mel, fstate = self.models.flow_stream_step(fstate, new, ahead, final=final)
                    t1 = time.perf_counter()
                    audio, vstate = self.models.hift.stream_step(
                        vstate, _apply_speed(mel, speed), final=final, generator=gen
                    )
                    t2 = time.perf_counter()
            else:
                # Encoder here; the ODE (~all of the flow's work) where the engine batches it with the
                # chunks of other streams that are ready at the same time; then the vocoder here.
                flow = self.models.flow
                t0 = time.perf_counter()
                with self.compute(first=first):
                    block = flow.stream_prepare(fstate, _token_ids(new), _token_ids(ahead), final=final)
                waited, shared = self.flow_solve(block, first, cancel)
                mel, fstate = flow.stream_finish(block)
                del block
                t1 = time.perf_counter()
                with self.compute(first=first):
                    audio, vstate = self.models.hift.stream_step(
                        vstate, _apply_speed(mel, speed), final=final, generator=gen
                    )
                t2 = time.perf_counter()
            frames = ratio * (fstate.n_tokens - before)
            _record(trace, len(new), frames, ratio * before, audio, t0, t1, t2, waited, shared)
            return audio

        def ready() -> Iterator[Tensor]:
            nonlocal offset, hop
            while len(have) - offset >= hop + look:
                audio = chunk(have[offset : offset + hop], have[offset + hop : offset + hop + look], False)
                offset += hop
                hop = min(schedule.max, hop * schedule.growth)
                if audio.numel():
                    yield audio[0]

        yield from ready()
        for tok in tokens:
            have.append(tok)
            yield from ready()
        audio = chunk(have[offset:], [], True)
        if audio.numel():
            yield audio[0]


def _limited(tokens: Iterator[int], limit: int | None) -> Iterator[int]:
    """``tokens``, raising ``TooLong`` when a token past ``limit`` arrives (before the flow sees it)."""
    if limit is None:
        return tokens

    def take() -> Iterator[int]:
        for n, tok in enumerate(tokens, 1):
            if n > limit:
                seconds = limit / RATES.token_rate
                raise TooLong(f"the speech is too long: over {limit} tokens ({seconds:.1f} s) in one piece")
            yield tok

    return take()


def _token_ids(tokens: list[int]) -> Tensor:
    """[1, n] int32, as ``Models.flow_stream_step`` passes them to the flow."""
    return torch.tensor(tokens, dtype=torch.int32)[None]


def _record(trace, n_tokens, frames, context, audio, t0, t1, t2, flow_wait=0.0, flow_batch=1) -> None:
    if trace is None:
        return
    trace.chunks.append(
        ChunkTrace(
            tokens=n_tokens,
            estimator_frames=frames,
            context_frames=context,
            samples=int(audio.shape[-1]),
            flow_s=t1 - t0,
            vocoder_s=t2 - t1,
            at_s=t2 - trace.started,
            flow_wait_s=flow_wait,
            flow_batch=flow_batch,
        )
    )
    if trace.first_audio_s is None and audio.numel():
        trace.first_audio_s = t2 - trace.started


def _apply_speed(mel: Tensor, speed: float) -> Tensor:
    """Change tempo by resampling the mel in time (official: linear interpolation to int(T / speed))."""
    if speed == 1.0 or mel.shape[2] == 0:
        return mel
    return F.interpolate(mel, size=max(1, int(mel.shape[2] / speed)), mode="linear")
