"""cosyvoice2: streaming zero-shot text-to-speech (an independent implementation of CosyVoice 2)."""

__version__ = "0.1.0"
