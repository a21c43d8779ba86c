"""One request type and one code path for every mode.

A ``Request`` says what to say (text, a stream of text pieces, or source speech tokens for voice
conversion), in which voice, and how (instruction, speed, seed, streaming schedule). ``Synthesizer.run``
turns it into audio chunks. The mode falls out of the request instead of being a method per mode:

=====================  ===============================  ======================  ==================
request                LM prompt text                   LM prompt speech        flow prompt
=====================  ===============================  ======================  ==================
voice with transcript  transcript ids (zero-shot)       voice tokens (aligned)  tokens + mel + emb
voice, no transcript   none (cross-lingual)             none                    tokens + mel + emb
voice + instruct       instruction ids (instruct2)      none                    tokens + mel + emb
embedding-only voice   none (sft)                       none                    embedding only
source tokens (vc)     LM skipped                       -                       unaligned tokens/mel
=====================  ===============================  ======================  ==================

All per-request state (RNG, LM cache, flow/vocoder stream state, chunk offsets) lives in locals of the
request's generator; models are shared read-only, so any number of requests can run side by side.

Randomness: each request owns a ``torch.Generator`` seeded with ``seed``. Offline synthesis draws the LM
samples and then the vocoder noise from it, in the official order, so a seed reproduces the official
audio. A streaming request interleaves LM and vocoder work, so its vocoder gets its own generator
derived from the seed: streaming output is still reproducible from the seed alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import RATES
from .errors import InputError
from .voice import VoiceReference

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
    ``fast`` keeps the flow's state between chunks so a chunk costs O(chunk); the first chunk is small.
    """

    kind: Literal["official", "fast"] = "fast"
    first: int = 12
    growth: int = 2
    max: int = 50

    @classmethod
    def official(cls) -> StreamSchedule:
        return cls(kind="official", first=25, growth=2, max=100)


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

    def validate(self) -> None:
        if not (MIN_SPEED <= float(self.speed) <= MAX_SPEED):
            raise InputError(f"speed must be between {MIN_SPEED} and {MAX_SPEED}, got {self.speed}")
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


def new_generator(seed: int | None, salt: int = 0) -> torch.Generator:
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    return torch.Generator().manual_seed((int(seed) + salt) % (2**63))


VOCODER_SALT = 0x5EED  # streaming: the vocoder's generator is derived from the request seed


@dataclass
class _Prompt:
    """The per-request view of a voice for one mode (tensors are shared with the voice, never mutated)."""

    lm_text: list[int]  # prompt text ids for the LM (transcript or instruction)
    lm_speech: Tensor  # [Lp] prompt speech tokens for the LM
    flow_tokens: Tensor  # [1, P] int32
    flow_mel: Tensor  # [1, 2P, 80]
    embedding: Tensor  # [1, D]


class Synthesizer:
    """Runs requests against one set of loaded models (see ``cosyvoice2.api.load``)."""

    def __init__(self, models) -> None:
        self.models = models

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
        elif voice.has_transcript:
            lm_text = list(voice.text_tokens) if voice.text_tokens else fe.encode(voice.text)
            lm_speech = tokens
        return _Prompt(lm_text, lm_speech, tokens[None], mel[None], voice.embedding[None])

    # -- the one code path -----------------------------------------------------------------------

    def run(self, req: Request) -> Iterator[Tensor]:
        """Yield float32 audio chunks [n] at RATES.sample_rate; one per text piece unless streaming."""
        req.validate()
        prompt = self._prompt(req)
        gen = new_generator(req.seed)
        vgen = new_generator(req.seed, VOCODER_SALT) if req.stream else gen
        if req.source_tokens is not None:
            yield from self._token2wav(iter(req.source_tokens.reshape(-1).tolist()), prompt, req, vgen)
            return
        if isinstance(req.text, str):
            pieces = self.models.frontend.text_pieces(req.text) if req.text_frontend else [req.text]
            for piece in pieces:
                ids = self.models.frontend.encode(piece)
                tokens = self.models.lm_generate(ids, prompt.lm_text, prompt.lm_speech, gen)
                yield from self._token2wav(tokens, prompt, req, vgen)
        else:
            text_ids = self.models.stream_text_ids(req.text, req.text_frontend)
            tokens = self.models.lm_generate_bistream(text_ids, prompt.lm_text, prompt.lm_speech, gen)
            yield from self._token2wav(tokens, prompt, req, vgen)

    # -- speech tokens -> audio ------------------------------------------------------------------

    def _token2wav(self, tokens: Iterator[int], prompt: _Prompt, req: Request, gen) -> Iterator[Tensor]:
        if not req.stream:
            yield self.offline(list(tokens), prompt, req.speed, gen)
        elif req.schedule.kind == "official":
            yield from self.stream_official(tokens, prompt, req.schedule, req.speed, gen)
        else:
            yield from self.stream_fast(tokens, prompt, req.schedule, req.speed, gen)

    def offline(self, tokens: list[int], prompt: _Prompt, speed: float, gen) -> Tensor:
        if not tokens:
            return torch.zeros(0)
        mel = self.models.flow_inference(tokens, prompt, streaming=False, finalize=True)
        mel = _apply_speed(mel, speed)
        audio, _ = self.models.hift.inference(mel, generator=gen)
        return audio[0]

    def stream_official(
        self, tokens: Iterator[int], prompt: _Prompt, schedule: StreamSchedule, speed: float, gen
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
                mel = self.models.flow_inference(
                    have[: offset + this_hop + look], prompt, streaming=True, finalize=False
                )[:, :, offset * ratio :]
                audio, vstate = self.models.hift.stream_step(
                    vstate, _apply_speed(mel, speed), final=False, generator=gen
                )
                offset += this_hop
                hop = min(schedule.max, hop * schedule.growth)
                if audio.numel():
                    yield audio[0]
        if not have:
            return
        # SPEC §16.2: the official final chunk runs the flow without chunk masks; the fixtures pin it.
        mel = self.models.flow_inference(have, prompt, streaming=False, finalize=True)[:, :, offset * ratio :]
        audio, _ = self.models.hift.stream_step(vstate, _apply_speed(mel, speed), final=True, generator=gen)
        if audio.numel():
            yield audio[0]

    def stream_fast(
        self, tokens: Iterator[int], prompt: _Prompt, schedule: StreamSchedule, speed: float, gen
    ) -> Iterator[Tensor]:
        """Chunk-causal streaming with the flow state kept between chunks: each chunk costs O(chunk)."""
        from .hift import VocoderStream

        look = self.models.flow.cfg.pre_lookahead_len
        fstate = self.models.flow_stream_start(prompt)
        vstate = VocoderStream()
        have: list[int] = []
        offset, hop = 0, schedule.first
        for tok in tokens:
            have.append(tok)
            if len(have) - offset >= hop + look:
                new = have[offset : offset + hop]
                ahead = have[offset + hop : offset + hop + look]
                mel, fstate = self.models.flow_stream_step(fstate, new, ahead, final=False)
                audio, vstate = self.models.hift.stream_step(
                    vstate, _apply_speed(mel, speed), final=False, generator=gen
                )
                offset += hop
                hop = min(schedule.max, hop * schedule.growth)
                if audio.numel():
                    yield audio[0]
        if not have:
            return
        mel, fstate = self.models.flow_stream_step(fstate, have[offset:], [], final=True)
        audio, _ = self.models.hift.stream_step(vstate, _apply_speed(mel, speed), final=True, generator=gen)
        if audio.numel():
            yield audio[0]


def _apply_speed(mel: Tensor, speed: float) -> Tensor:
    """Change tempo by resampling the mel in time (official: linear interpolation to int(T / speed))."""
    if speed == 1.0 or mel.shape[2] == 0:
        return mel
    return F.interpolate(mel, size=max(1, int(mel.shape[2] / speed)), mode="linear")
