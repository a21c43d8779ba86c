"""Errors a user can act on. The CLI and the server turn these into messages, never tracebacks."""


class CosyVoiceError(Exception):
    """Base class: something the user gave us (or our model files) is not usable."""


class InputError(CosyVoiceError, ValueError):
    """Bad request input: text, audio, voice, options."""


class TooLong(InputError):
    """A request's speech passed its budget (``max_tokens``): it would take more memory than allowed."""


class ModelLoadError(CosyVoiceError):
    """A model directory or checkpoint is missing, corrupt or does not match its config."""
