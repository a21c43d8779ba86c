"""Data tooling: the synthetic multi-speaker corpus builder (``python -m cosyvoice2.data.corpus``).

Heavy optional dependencies (the ``data`` extra: Kokoro/misaki/espeak, Debian TTS voices) are imported
lazily by :mod:`cosyvoice2.data.corpus`, so importing this package is cheap.
"""

__all__ = ["corpus"]
