"""Load a model directory into ``Models``: the networks, the frontend and the built-in speakers.

Two layouts are read:

* the official CosyVoice2-0.5B layout, unchanged: ``cosyvoice2.yaml`` (parsed, never executed),
  ``llm.pt`` / ``flow.pt`` / ``hift.pt`` (through ``cosyvoice2.convert``), ``CosyVoice-BlankEN/``
  (tokenizer files + Qwen2 ``config.json``), ``speech_tokenizer_v2.onnx``, ``campplus.onnx`` and an
  optional ``spk2info.pt``;
* our own shipped layout (``cosyvoice2.json`` + safetensors), see ``cosyvoice2.default_model``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from . import convert
from .errors import InputError, ModelLoadError
from .flow import Flow, FlowConfig
from .frontend import Frontend, onnx_embed_fn, onnx_tokenize_fn
from .hift import HiFT, HiFTConfig
from .lm import CosyVoice2LM, LMConfig
from .official_yaml import load_official_yaml
from .onnx_models import SpeakerEncoder, SpeechTokenizer
from .text import StreamingNormalizer, TextTokenizer
from .voice import VoiceReference

OFFICIAL_YAML = "cosyvoice2.yaml"
QWEN_DIR = "CosyVoice-BlankEN"


@dataclass
class Models:
    """Everything a request runs on. Shared and read-only: no per-request state lives here."""

    lm: CosyVoice2LM
    flow: Flow
    hift: HiFT
    frontend: Frontend
    speakers: dict[str, VoiceReference] = field(default_factory=dict)
    default_speaker: str | None = None
    source: Path | None = None
    # Whether the LM continues from a voice's transcript and prompt tokens when a request leaves it to the
    # model (``synthesis.Request.cross_lingual`` None): "always" (the official behaviour), only when the
    # text's language "match"es the transcript's, or "never" (a model whose LM reads worse after a prompt).
    prompt_language: str = "always"

    # -- adapters used by the synthesizer ----------------------------------------------------------

    def default_voice(self) -> VoiceReference:
        if self.default_speaker is None:
            raise InputError("this model has no built-in voice: give a prompt audio or a saved voice")
        return self.speakers[self.default_speaker]

    def speaker(self, name: str) -> VoiceReference:
        if name not in self.speakers:
            known = ", ".join(sorted(self.speakers)) or "none"
            raise InputError(f"unknown speaker {name!r} (built-in speakers: {known})")
        return self.speakers[name]

    def lm_generate(
        self, text_ids: list[int], prompt_text: list[int], prompt_speech: Tensor, gen
    ) -> Iterator[int]:
        return self.lm.generate(text_ids, prompt_text, prompt_speech, generator=gen)

    def stream_text_ids(self, pieces: Iterable[str], text_frontend: bool = True) -> Iterator[list[int]]:
        """Text pieces arriving from e.g. an LLM -> token-id chunks, normalised on the fly."""
        norm = StreamingNormalizer(backend=self.frontend.text_backend) if text_frontend else None
        any_text = False
        for piece in pieces:
            if not isinstance(piece, str):
                raise InputError("streamed text pieces must be strings")
            for seg in norm.push(piece) if norm else [piece]:
                ids = self.frontend.encode(seg)
                if ids:
                    any_text = True
                    yield ids
        for seg in norm.flush() if norm else []:
            ids = self.frontend.encode(seg)
            if ids:
                any_text = True
                yield ids
        if not any_text:
            raise InputError("the text stream had nothing to speak")

    def lm_generate_bistream(
        self, chunks: Iterator[list[int]], prompt_text: list[int], prompt_speech: Tensor, gen
    ) -> Iterator[int]:
        return self.lm.generate_bistream(chunks, prompt_text, prompt_speech, generator=gen)

    def flow_inference(self, tokens: list[int], prompt, *, streaming: bool, finalize: bool) -> Tensor:
        tok = torch.tensor(tokens, dtype=torch.int32)[None]
        return self.flow.inference(
            tok, prompt.flow_tokens, prompt.flow_mel, prompt.embedding, streaming=streaming, finalize=finalize
        )

    def flow_stream_start(
        self, prompt, *, cache_dtype: torch.dtype = torch.float32, static_chunks: bool = False
    ):
        return self.flow.stream_start(
            prompt.flow_tokens,
            prompt.flow_mel,
            prompt.embedding,
            static_chunks=static_chunks,
            cache_dtype=cache_dtype,
        )

    def flow_stream_step(self, state, new: list[int], ahead: list[int], *, final: bool):
        new_t = torch.tensor(new, dtype=torch.int32)[None]
        ahead_t = torch.tensor(ahead, dtype=torch.int32)[None]
        return self.flow.stream_step(state, new_t, ahead_t, final=final)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelLoadError(f"missing file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None


def load_official_dir(model_dir: str | Path, *, onnx_threads: int = 1, text_backend: str = "auto") -> Models:
    """Load an official CosyVoice2-0.5B directory (or one in that layout) as it was downloaded."""
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelLoadError(f"model directory not found: {root}")
    cfg = load_official_yaml(root / OFFICIAL_YAML)
    for key in ("llm", "flow", "hift"):
        if key not in cfg:
            raise ModelLoadError(f"{root / OFFICIAL_YAML}: no '{key}' section")
    qwen = _read_json(root / QWEN_DIR / "config.json")
    # The LM has no buffers, so it is built on the meta device (no wasted random init of 0.5 B
    # parameters) and materialised by the checkpoint. Flow and HiFT hold non-persistent buffers (the
    # fixed CFM noise, the STFT window) that a meta build would lose, so they are built for real.
    with torch.device("meta"):
        lm = CosyVoice2LM(LMConfig.from_official(cfg, qwen))
    lm = convert.load_llm(lm.to_empty(device="cpu"), root / "llm.pt").eval()
    flow = convert.load_flow(Flow(FlowConfig.from_official(cfg)), root / "flow.pt").eval()
    hift = convert.load_hift(HiFT(HiFTConfig.from_official(cfg)), root / "hift.pt").eval()
    tokenizer = TextTokenizer.from_dir(root / QWEN_DIR)
    frontend = Frontend(
        tokenizer=tokenizer,
        tokenize_speech=onnx_tokenize_fn(
            SpeechTokenizer(root / "speech_tokenizer_v2.onnx", threads=onnx_threads)
        ),
        embed_speaker=onnx_embed_fn(SpeakerEncoder(root / "campplus.onnx", threads=onnx_threads)),
        text_backend=text_backend,
    )
    speakers = load_spk2info(root / "spk2info.pt") if (root / "spk2info.pt").exists() else {}
    default = next(iter(speakers), None)
    return Models(lm, flow, hift, frontend, speakers, default, root)


def load_spk2info(path: Path) -> dict[str, VoiceReference]:
    """Official ``spk2info.pt`` ({name: {tensor name: tensor}}) -> voices."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a load error for the user
        raise ModelLoadError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a dict of speakers")
    return {str(k): VoiceReference.from_official_spk2info(str(k), v) for k, v in data.items()}
