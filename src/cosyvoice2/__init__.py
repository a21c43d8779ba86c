"""cosyvoice2: streaming zero-shot text-to-speech (an independent implementation of CosyVoice 2)."""

from .errors import CosyVoiceError, InputError, ModelLoadError
from .voice import VoiceReference

__version__ = "0.1.0"
__all__ = [
    "CancelToken",
    "Cancelled",
    "CosyVoice2",
    "CosyVoiceError",
    "InputError",
    "ModelLoadError",
    "VoiceReference",
    "load",
]


def load(path=None, **kwargs):
    """Load a model directory (None: the shipped default model). See ``cosyvoice2.api.load``."""
    from .api import load as _load

    return _load(path, **kwargs)


def __getattr__(name):
    if name == "CosyVoice2":
        from .api import CosyVoice2

        return CosyVoice2
    if name in ("CancelToken", "Cancelled"):  # lazily: they live beside torch code
        from . import synthesis

        return getattr(synthesis, name)
    raise AttributeError(name)
