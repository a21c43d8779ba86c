"""The public Python API.

    import cosyvoice2
    tts = cosyvoice2.load()                     # the shipped model, or load("path/to/CosyVoice2-0.5B")
    voice = tts.voice("prompt.wav", text="transcript of the prompt")
    audio = tts.synthesize("Hello there.", voice=voice)           # float32 numpy, tts.sample_rate Hz
    for chunk in tts.stream(llm_text_pieces, voice=voice): ...    # audio while the text is still arriving
    converted = tts.convert("source.wav", voice)                  # voice conversion

``voice`` is a ``VoiceReference``, the name of a built-in speaker, a path to a saved ``.voice`` file, or None
(the model's default voice). A voice with a transcript means zero-shot cloning, without one cross-lingual
synthesis, with ``instruct`` instruction-controlled synthesis (instruct2).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from .audio import AudioSource
from .config import RATES
from .errors import InputError
from .model_dir import OFFICIAL_YAML, Models, load_official_dir
from .synthesis import Request, StreamSchedule, Synthesizer
from .voice import VoiceReference

VoiceLike = VoiceReference | str | Path | None


class CosyVoice2:
    """A loaded model. Thread-safe: requests keep their state to themselves."""

    def __init__(self, models: Models) -> None:
        self.models = models
        self.synth = Synthesizer(models)
        self.sample_rate = RATES.sample_rate

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
    ) -> Request:
        if isinstance(schedule, str):
            schedule = StreamSchedule.official() if schedule == "official" else StreamSchedule()
        if text is not None and not isinstance(text, str) and not isinstance(text, Iterable):
            raise InputError(f"text must be a string or an iterable of strings, not {type(text).__name__}")
        return Request(
            text=text,
            voice=self.resolve_voice(voice),
            instruct=instruct,
            speed=float(speed),
            seed=seed,
            stream=stream,
            schedule=schedule or StreamSchedule(),
            text_frontend=text_frontend,
        )

    def synthesize(
        self,
        text: str | Iterable[str],
        voice: VoiceLike = None,
        instruct: str | None = None,
        speed: float = 1.0,
        seed: int | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        """Text (any length; long texts are split into sentences) -> float32 audio [n]."""
        req = self.request(text, voice, instruct, speed, seed)
        chunks = self.synth.run(req)
        if progress and isinstance(text, str):
            from tqdm import tqdm

            n = len(self.models.frontend.text_pieces(text))
            if n > 1:
                chunks = tqdm(chunks, total=n, unit="sentence", desc="synthesising")
        return _join(chunks)

    def stream(
        self,
        text: str | Iterable[str],
        voice: VoiceLike = None,
        instruct: str | None = None,
        speed: float = 1.0,
        seed: int | None = None,
        schedule: StreamSchedule | str | None = None,
        text_frontend: bool = True,
    ) -> Iterator[np.ndarray]:
        """Audio chunks as they are made. ``text`` may be an iterable of pieces still being written.

        Closing the returned generator (or dropping it) cancels the request and frees its state.
        """
        req = self.request(
            text, voice, instruct, speed, seed, stream=True, schedule=schedule, text_frontend=text_frontend
        )
        for chunk in self.synth.run(req):
            yield chunk.detach().numpy().astype(np.float32, copy=False)

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
        return _join(self.synth.run(req))


def _join(chunks: Iterable[torch.Tensor]) -> np.ndarray:
    parts = [c.detach().numpy().astype(np.float32, copy=False) for c in chunks]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def load(path: str | Path | None = None, *, text_backend: str = "auto") -> CosyVoice2:
    """Load a model directory: an official CosyVoice2-0.5B download, or (None) the shipped default model."""
    if path is None:
        from .default_model import default_model_dir

        path = default_model_dir()
    root = Path(path)
    if (root / OFFICIAL_YAML).exists():
        return CosyVoice2(load_official_dir(root, text_backend=text_backend))
    from .default_model import NATIVE_CONFIG, load_native_dir

    if (root / NATIVE_CONFIG).exists():
        return CosyVoice2(load_native_dir(root, text_backend=text_backend))
    from .errors import ModelLoadError

    raise ModelLoadError(f"{root} is not a model directory (no {OFFICIAL_YAML} or {NATIVE_CONFIG})")
