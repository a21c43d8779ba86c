"""A voice: everything synthesis needs from a prompt, computed once and reusable in every mode.

A ``VoiceReference`` holds the prompt's speech tokens (25 Hz), its 80-bin mel (50 Hz), its speaker
embedding and, optionally, its transcript. With a transcript it drives zero-shot cloning; without one,
cross-lingual synthesis; with an instruction, instruct2; as the target of voice conversion it gives the
flow its prompt. Voices are saved as safetensors (tensors) plus JSON metadata in the same file, written
atomically so a crash never leaves a half-written voice behind.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from .config import RATES
from .errors import InputError
from .fileio import atomic_write_bytes

FORMAT_VERSION = 1


@dataclass
class VoiceReference:
    """Prompt features of one voice.

    Shapes: ``speech_tokens`` [L] int32 (unaligned, as the tokenizer produced them); ``mel`` [T, 80]
    float32 at RATES.mel_rate; ``embedding`` [D] float32 speaker embedding (not normalised).
    ``text`` is the normalised transcript; ``text_tokens`` (optional) pins its token ids exactly (voices
    imported from an official spk2info.pt carry the ids the official code stored).
    A voice with only an embedding (official SFT speakers) conditions the flow on the speaker alone.
    """

    embedding: Tensor
    speech_tokens: Tensor | None = None
    mel: Tensor | None = None
    text: str | None = None
    text_tokens: list[int] | None = None
    name: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.embedding = self.embedding.detach().float().reshape(-1)
        if self.speech_tokens is not None:
            self.speech_tokens = self.speech_tokens.detach().to(torch.int32).reshape(-1)
        if self.mel is not None:
            self.mel = self.mel.detach().float().reshape(-1, self.mel.shape[-1])
        if (self.speech_tokens is None) != (self.mel is None):
            raise InputError("a voice needs both prompt speech tokens and prompt mel, or neither")

    @property
    def has_prompt(self) -> bool:
        """True when the voice has prompt audio features (tokens + mel), not just an embedding."""
        return self.speech_tokens is not None

    @property
    def has_transcript(self) -> bool:
        return bool(self.text_tokens) or bool(self.text and self.text.strip())

    @property
    def duration(self) -> float:
        """Prompt duration in seconds (0 for embedding-only voices)."""
        return 0.0 if self.mel is None else self.mel.shape[0] / RATES.mel_rate

    def aligned(self) -> tuple[Tensor, Tensor]:
        """Tokens [L] and mel [2L, 80] cut to exactly ``token_mel_ratio`` mel frames per token.

        The official zero-shot frontend does this for 24 kHz models so the flow's prompt and target share
        one frame grid (SPEC §6.3); voice conversion uses the unaligned features.
        """
        assert self.speech_tokens is not None and self.mel is not None
        r = RATES.token_mel_ratio
        n = min(self.mel.shape[0] // r, self.speech_tokens.shape[0])
        return self.speech_tokens[:n], self.mel[: n * r]

    # ---------------------------------------------------------------------------------------------
    # persistence
    # ---------------------------------------------------------------------------------------------

    def to_bytes(self, dtype: torch.dtype = torch.float32) -> bytes:
        """The voice file's bytes. ``dtype`` stores the mel and embedding (float16 halves a shipped voice,
        at ~1e-3 relative rounding; they are read back as float32 either way)."""
        if not dtype.is_floating_point:
            raise InputError(f"a voice stores its features as floats, not {dtype}")
        tensors = {"embedding": self.embedding.to(dtype).contiguous()}
        if self.has_prompt:
            tensors["speech_tokens"] = self.speech_tokens.contiguous()
            tensors["mel"] = self.mel.to(dtype).contiguous()
        meta = {
            "format": "cosyvoice2.voice",
            "version": str(FORMAT_VERSION),
            "info": json.dumps(
                {"text": self.text, "text_tokens": self.text_tokens, "name": self.name, "meta": self.meta},
                ensure_ascii=False,
            ),
        }
        return st_save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> VoiceReference:
        try:
            tensors = st_load(data)
            # safetensors.torch.load drops the metadata; it is the JSON header after an 8-byte length.
            header_len = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + header_len])
            meta = header.get("__metadata__", {})
        except (SafetensorError, ValueError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{source} is not a cosyvoice2 voice file: {e}") from None
        if meta.get("format") != "cosyvoice2.voice" or "embedding" not in tensors:
            raise InputError(f"{source} is not a cosyvoice2 voice file")
        if int(meta.get("version", "0")) > FORMAT_VERSION:
            raise InputError(f"{source} was written by a newer cosyvoice2 (voice format {meta['version']})")
        info = json.loads(meta.get("info", "{}"))
        return cls(
            embedding=tensors["embedding"],
            speech_tokens=tensors.get("speech_tokens"),
            mel=tensors.get("mel"),
            text=info.get("text"),
            text_tokens=info.get("text_tokens"),
            name=info.get("name"),
            meta=info.get("meta") or {},
        )

    def save(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
        """Write the voice atomically (temp file in the same directory, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, self.to_bytes(dtype))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> VoiceReference:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"voice file not found: {path}")
        return cls.from_bytes(path.read_bytes(), str(path))

    @classmethod
    def from_official_spk2info(cls, name: str, entry: dict[str, Tensor]) -> VoiceReference:
        """Import one entry of an official ``spk2info.pt``.

        Entries made by the official ``add_zero_shot_spk`` hold the whole zero-shot prompt; SFT speakers
        hold only ``embedding``. The official code stores the prompt transcript as token ids only.
        """
        emb = entry.get("flow_embedding", entry.get("embedding", entry.get("llm_embedding")))
        if emb is None:
            raise InputError(f"speaker {name!r} in spk2info has no embedding")
        tokens = entry.get("flow_prompt_speech_token", entry.get("llm_prompt_speech_token"))
        mel = entry.get("prompt_speech_feat")
        text_tokens = entry.get("prompt_text")
        return cls(
            embedding=emb,
            speech_tokens=None if tokens is None else tokens.reshape(-1),
            mel=None if mel is None else mel.reshape(-1, mel.shape[-1]),
            text_tokens=None if text_tokens is None else [int(t) for t in text_tokens.reshape(-1)],
            name=name,
        )
