"""The frontend: user text and prompt audio -> what the models consume.

* text: normalise and split (``cosyvoice2.text``), then BPE ids;
* prompt audio -> ``VoiceReference``: flow prompt mel (24 kHz), speech tokens (16 kHz whisper log-mel
  through the speech tokenizer), speaker embedding (16 kHz Kaldi fbank through the speaker encoder);
* voice-conversion source audio -> speech tokens.

The speech tokenizer and speaker encoder are plain callables so that the official ONNX models and our own
PyTorch ones plug in the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .audio import AudioSource, campplus_features, load_audio, prompt_mel, whisper_log_mel
from .config import RATES
from .errors import InputError
from .onnx_models import SpeakerEncoder, SpeechTokenizer
from .text import TextTokenizer, normalize, prepare_text
from .voice import VoiceReference

# wav16k [1, N] -> tokens [L] int32 / embedding [D] float32
TokenizeFn = Callable[[Tensor], Tensor]
EmbedFn = Callable[[Tensor], Tensor]

MIN_PROMPT_SECONDS = 0.5  # shorter prompts carry too little voice to clone and yield < 13 tokens
MAX_PROMPT_SECONDS = 30.0  # the speech tokenizer's limit (official assertion)
MAX_SOURCE_SECONDS = 30.0  # voice conversion source, same tokenizer limit


def onnx_tokenize_fn(model: SpeechTokenizer) -> TokenizeFn:
    return lambda wav16: model.tokens(whisper_log_mel(wav16)).reshape(-1)


def onnx_embed_fn(model: SpeakerEncoder) -> EmbedFn:
    return lambda wav16: model.embed(campplus_features(wav16)).reshape(-1)


@dataclass
class Frontend:
    tokenizer: TextTokenizer
    tokenize_speech: TokenizeFn | None
    embed_speaker: EmbedFn | None
    text_backend: str = "auto"

    # -- text ------------------------------------------------------------------------------------

    def text_pieces(self, text: str) -> list[str]:
        """Normalised pieces of a synthesis text (each one is synthesised on its own)."""
        return prepare_text(text, tokenizer=self.tokenizer, backend=self.text_backend)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def instruct_ids(self, instruct: str) -> list[int]:
        """Token ids of an instruct2 prompt. The official code does not normalise it; it must end with
        <|endofprompt|>, which we append when the user left it out."""
        if not isinstance(instruct, str) or not instruct.strip():
            raise InputError("instruct must be a non-empty string")
        ids = self.tokenizer.encode(instruct.strip())
        eop = self.tokenizer.endofprompt_id
        if eop not in ids:
            ids.append(eop)
        return ids

    # -- voices ----------------------------------------------------------------------------------

    def voice(
        self,
        audio: AudioSource,
        text: str | None = None,
        *,
        name: str | None = None,
        src_rate: int | None = None,
    ) -> VoiceReference:
        """Prompt audio (path, bytes, file-like or array with ``src_rate``) + optional transcript -> voice."""
        limits = dict(min_seconds=MIN_PROMPT_SECONDS, max_seconds=MAX_PROMPT_SECONDS, src_rate=src_rate)
        wav24 = load_audio(audio, RATES.sample_rate, **limits)
        if hasattr(audio, "seek"):
            audio.seek(0)
        wav16 = load_audio(audio, RATES.tokenizer_sample_rate, **limits)
        return self.voice_from_waveforms(wav24, wav16, text, name=name)

    def voice_from_waveforms(
        self, wav24: np.ndarray, wav16: np.ndarray, text: str | None = None, *, name: str | None = None
    ) -> VoiceReference:
        """The same prompt at 24 kHz (flow mel) and 16 kHz (tokens, embedding) -> voice."""
        if self.tokenize_speech is None or self.embed_speaker is None:
            raise InputError(
                "this model has no speech tokenizer / speaker encoder, so it cannot clone voices"
            )
        t24 = torch.from_numpy(np.ascontiguousarray(wav24, np.float32)).reshape(1, -1)
        t16 = torch.from_numpy(np.ascontiguousarray(wav16, np.float32)).reshape(1, -1)
        with torch.inference_mode():
            mel = prompt_mel(t24)[0]  # [T, 80]
            tokens = self.tokenize_speech(t16)
            embedding = self.embed_speaker(t16)
        if tokens.numel() == 0:
            raise InputError("the prompt audio produced no speech tokens (too short?)")
        transcript = None
        if text is not None:
            if not isinstance(text, str):
                raise InputError("the prompt transcript must be a string")
            if text.strip():
                # The official zero-shot frontend normalises the prompt text without splitting.
                transcript = normalize(text, split=False, tokenizer=self.tokenizer, backend=self.text_backend)
                if not transcript.strip():
                    raise InputError("the prompt transcript has nothing speakable in it")
        return VoiceReference(embedding=embedding, speech_tokens=tokens, mel=mel, text=transcript, name=name)

    def source_tokens(self, audio: AudioSource, *, src_rate: int | None = None) -> Tensor:
        """Voice-conversion source audio -> speech tokens [L] int32."""
        if self.tokenize_speech is None:
            raise InputError("this model has no speech tokenizer, so it cannot convert voices")
        wav16 = load_audio(
            audio,
            RATES.tokenizer_sample_rate,
            src_rate=src_rate,
            min_seconds=MIN_PROMPT_SECONDS,
            max_seconds=MAX_SOURCE_SECONDS,
        )
        return self.source_tokens_from_waveform(wav16)

    def source_tokens_from_waveform(self, wav16: np.ndarray) -> Tensor:
        t16 = torch.from_numpy(np.ascontiguousarray(wav16, np.float32)).reshape(1, -1)
        with torch.inference_mode():
            tokens = self.tokenize_speech(t16).reshape(-1).to(torch.int32)
        if tokens.numel() == 0:
            raise InputError("the source audio produced no speech tokens")
        return tokens
